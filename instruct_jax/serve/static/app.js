// The page of `python -m instruct_jax serve`: chat with a served model (streamed), and rank several
// anonymised answers to one prompt for the reward model's training data. Plain JavaScript, no build step.
// State a test can wait on is in data-* attributes: body[data-models], #chat-status[data-state],
// #rank-status[data-state] (and data-row after a ranking is saved).
"use strict";

(() => {
  const STORE_KEY = "instruct_jax.apiKey";
  const STORE_LABELER = "instruct_jax.labeler";
  const K_MIN = 2, K_MAX = 9, MODELS_MIN = 2, MODELS_MAX = 4;

  const $ = (id) => document.getElementById(id);

  // --- storage (private windows may refuse it: the page still works, it just forgets) -------------
  function load(key) {
    try { return localStorage.getItem(key) || ""; } catch { return ""; }
  }
  function save(key, value) {
    try {
      if (value) localStorage.setItem(key, value); else localStorage.removeItem(key);
    } catch { /* not remembered */ }
  }

  // --- server requests --------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = load(STORE_KEY);
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // The message of an error response: {"error": {"message"}} (this server, OpenAI), {"detail"} (FastAPI's
  // own), or the text.
  async function errorOf(res) {
    let message = `${res.status} ${res.statusText}`.trim();
    let text = "";
    try { text = await res.text(); } catch { /* body unreadable */ }
    try {
      const body = JSON.parse(text);
      if (body && body.error) {
        message = typeof body.error === "string" ? body.error : body.error.message || JSON.stringify(body.error);
      } else if (body && body.detail !== undefined) {
        const d = body.detail;
        message = Array.isArray(d) ? d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("\n")
          : typeof d === "string" ? d : JSON.stringify(d);
      }
    } catch {
      if (text) message += `: ${text.slice(0, 500)}`;
    }
    if (res.status === 401) showAuth();
    return new ApiError(message, res.status);
  }

  async function api(path, { method = "GET", body, signal } = {}) {
    let res;
    try {
      res = await fetch(path, {
        method, headers: headers(), signal, body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`could not reach the server (${e.message})`, 0);
    }
    if (!res.ok) throw await errorOf(res);
    return res;
  }

  function showError(el, message) {
    el.textContent = message;
    el.hidden = false;
  }
  function clearError(el) {
    el.textContent = "";
    el.hidden = true;
  }

  // --- API key (asked for only after a 401) -----------------------------------------------------
  function showAuth() {
    const box = $("auth");
    const wasHidden = box.hidden;
    box.hidden = false;
    $("api-key").value = load(STORE_KEY);
    if (wasHidden) $("api-key").focus();
  }

  $("auth-form").addEventListener("submit", (e) => {
    e.preventDefault();
    save(STORE_KEY, $("api-key").value.trim());
    $("auth").hidden = true;
    loadModels();
  });

  // --- tabs ---------------------------------------------------------------------------------------
  const tabs = [$("tab-chat"), $("tab-rank")];

  function selectTab(tab, focus) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    history.replaceState(null, "", tab.id === "tab-rank" ? "#rank" : "#chat");
  }

  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab, false));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        e.preventDefault();
        selectTab(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length], true);
      }
    });
  });
  if (location.hash === "#rank") selectTab($("tab-rank"), false);

  // --- models ---------------------------------------------------------------------------------------
  let models = [];

  function modelLabel(m) {
    return m.version === undefined || m.version === null ? m.id : `${m.id} (v${m.version})`;
  }

  function fillSelect(select, list) {
    const previous = select.value;
    select.replaceChildren(...list.map((m) => new Option(modelLabel(m), m.id)));
    if (list.some((m) => m.id === previous)) select.value = previous;
  }

  function fillModelChoices() {
    const box = $("rank-models");
    const checked = new Set([...box.querySelectorAll("input:checked")].map((c) => c.value));
    const inactive = !$("rank-source-models").checked;
    box.replaceChildren(...models.map((m, i) => {
      const label = document.createElement("label");
      label.className = "inline";
      const input = document.createElement("input");
      input.type = "checkbox";
      input.value = m.id;
      input.id = `rank-model-option-${i}`;
      input.dataset.testid = "rank-model-option";
      input.checked = checked.size ? checked.has(m.id) : i < MODELS_MAX;
      input.disabled = inactive;
      label.append(input, ` ${modelLabel(m)}`);
      return label;
    }));
    const several = models.length >= MODELS_MIN;
    $("rank-source-models").disabled = !several;
    $("rank-models-note").hidden = several;
    if (!several && $("rank-source-models").checked) {
      $("rank-source-k").checked = true;
      updateSource();
    }
  }

  async function loadModels() {
    document.body.dataset.models = "loading";
    clearError($("app-error"));
    try {
      const body = await (await api("v1/models")).json();
      models = Array.isArray(body.data) ? body.data : [];
      fillSelect($("chat-model"), models);
      fillSelect($("rank-model"), models);
      fillModelChoices();
      if (!models.length) showError($("app-error"), "The server serves no models.");
      document.body.dataset.models = "ready";
    } catch (e) {
      showError($("app-error"), `Could not load the list of models: ${e.message}`);
      document.body.dataset.models = "error";
    }
  }

  $("models-refresh").addEventListener("click", loadModels);

  // --- chat -----------------------------------------------------------------------------------------
  const chat = { messages: [], controller: null, image: null };  // image: the attached file as a data URL
  const transcript = $("chat-transcript");

  function setChatStatus(state, text) {
    const el = $("chat-status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function addBubble(role, text, image) {
    $("chat-empty").hidden = true;
    const el = document.createElement("div");
    el.className = `msg msg-${role}`;
    el.dataset.testid = `msg-${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    el.append(who, body);
    if (image) {
      const thumb = document.createElement("img");
      thumb.className = "thumb";
      thumb.alt = "attached image";
      thumb.src = image;
      el.append(thumb);
    }
    transcript.append(el);
    transcript.scrollTop = transcript.scrollHeight;
    return el;
  }

  function numberOf(id) {
    return Number($(id).value);
  }

  // The events of a text/event-stream body: `data: {...}` lines, an empty line ends an event,
  // `data: [DONE]` ends the stream. Calls onText with each choices[0].delta.content; returns the finish_reason.
  async function readStream(res, onText) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", data = [], finish = null, done = false;

    const dispatch = () => {
      if (!data.length) return;
      const payload = data.join("\n");
      data = [];
      if (payload.trim() === "[DONE]") { done = true; return; }
      let event;
      try {
        event = JSON.parse(payload);
      } catch {
        throw new ApiError(`unreadable event from the server: ${payload.slice(0, 200)}`);
      }
      if (event.error) throw new ApiError(event.error.message || JSON.stringify(event.error));
      const choice = event.choices && event.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) onText(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    };
    const line = (l) => {
      if (l === "") return dispatch();
      if (l.startsWith(":")) return; // comment / keep-alive
      const colon = l.indexOf(":");
      const field = colon < 0 ? l : l.slice(0, colon);
      let value = colon < 0 ? "" : l.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
    };

    for (;;) {
      const { value, done: end } = await reader.read();
      buffer += end ? decoder.decode() : decoder.decode(value, { stream: true });
      let m;
      while (!done && (m = /\r\n|\r|\n/.exec(buffer))) {
        const l = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        line(l);
      }
      if (done) { reader.cancel().catch(() => {}); break; }
      if (end) {
        if (buffer) line(buffer);
        dispatch();
        break;
      }
    }
    if (!done && finish === null) throw new ApiError("the stream ended before the answer was finished");
    return finish;
  }

  function setStreaming(on) {
    $("chat-send").disabled = on;
    $("chat-stop").disabled = !on;
  }

  async function sendChat() {
    if (chat.controller) return;
    const input = $("chat-input");
    const text = input.value;
    const image = chat.image;
    if (!text.trim() && !image) { input.focus(); return; }
    if (!$("chat-form").reportValidity()) return;
    clearError($("chat-error"));

    // With an image: OpenAI content parts, the text then the image (a data URL; the server fetches nothing).
    const content = image ? [{ type: "text", text }, { type: "image_url", image_url: { url: image } }] : text;
    const userMessage = { role: "user", content };
    chat.messages.push(userMessage);
    const userEl = addBubble("user", text, image);
    input.value = "";
    setImage(null);
    const system = $("chat-system").value.trim();
    const messages = (system ? [{ role: "system", content: system }] : []).concat(chat.messages);

    const replyEl = addBubble("assistant", "");
    replyEl.dataset.streaming = "true";
    const replyText = replyEl.querySelector(".text");
    let reply = "";
    const controller = new AbortController();
    chat.controller = controller;
    setStreaming(true);
    setChatStatus("streaming", "Generating…");

    // Take back a turn that produced nothing usable: the user's text goes back into the box.
    const undoTurn = () => {
      chat.messages.splice(chat.messages.indexOf(userMessage), 1);
      userEl.remove();
      replyEl.remove();
      if (!input.value) input.value = text;
      if (image && !chat.image) setImage(image);
      if (!chat.messages.length) $("chat-empty").hidden = false;
    };

    try {
      const res = await api("v1/chat/completions", {
        method: "POST",
        signal: controller.signal,
        body: {
          model: $("chat-model").value,
          messages,
          stream: true,
          temperature: numberOf("chat-temperature"),
          top_p: numberOf("chat-top-p"),
          max_tokens: numberOf("chat-max-tokens"),
        },
      });
      const finish = await readStream(res, (piece) => {
        const atBottom = transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40;
        reply += piece;
        replyText.textContent = reply;
        if (atBottom) transcript.scrollTop = transcript.scrollHeight;
      });
      chat.messages.push({ role: "assistant", content: reply });
      replyEl.dataset.finish = finish || "";
      if (finish === "length") {
        const note = document.createElement("div");
        note.className = "note";
        note.textContent = "(cut off at max tokens)";
        replyEl.append(note);
      }
      setChatStatus("done", finish ? `Done (${finish}).` : "Done.");
    } catch (e) {
      if (e.name === "AbortError") {
        if (reply) {
          chat.messages.push({ role: "assistant", content: reply });
          replyEl.dataset.finish = "stopped";
          const note = document.createElement("div");
          note.className = "note";
          note.textContent = "(stopped)";
          replyEl.append(note);
        } else {
          undoTurn();
        }
        setChatStatus("stopped", "Stopped.");
      } else {
        undoTurn();
        showError($("chat-error"), e.message);
        setChatStatus("error", "");
      }
    } finally {
      delete replyEl.dataset.streaming;
      if (chat.controller === controller) chat.controller = null;
      setStreaming(false);
      transcript.scrollTop = transcript.scrollHeight;
    }
  }

  // The attached image: read as a data URL when chosen, shown as a thumbnail, sent with the next message.
  function setImage(url) {
    chat.image = url;
    const preview = $("chat-image-preview");
    preview.hidden = !url;
    $("chat-image-clear").hidden = !url;
    if (url) preview.src = url; else preview.removeAttribute("src");
    if (!url) $("chat-image").value = "";
  }

  $("chat-image").addEventListener("change", () => {
    const file = $("chat-image").files[0];
    if (!file) { setImage(null); return; }
    const reader = new FileReader();
    reader.onload = () => setImage(reader.result);
    reader.onerror = () => { setImage(null); showError($("chat-error"), `cannot read ${file.name}`); };
    reader.readAsDataURL(file);
  });
  $("chat-image-clear").addEventListener("click", () => setImage(null));

  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sendChat();
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("chat-form").requestSubmit($("chat-send"));
    }
  });
  $("chat-stop").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
  });
  $("chat-reset").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.controller = null;
    chat.messages = [];
    setImage(null);
    transcript.querySelectorAll(".msg").forEach((el) => el.remove());
    $("chat-empty").hidden = false;
    clearError($("chat-error"));
    setChatStatus("idle", "");
    setStreaming(false);
    $("chat-input").focus();
  });

  // --- rank -----------------------------------------------------------------------------------------
  const rank = { sample: null, busy: false };
  const rankError = $("rank-error");

  function setRankStatus(state, text) {
    const el = $("rank-status");
    el.dataset.state = state;
    el.textContent = text;
  }

  function letter(i) {
    return i < 26 ? String.fromCharCode(65 + i) : String(i + 1);
  }

  function updateSource() {
    const k = $("rank-source-k").checked;
    $("rank-k-options").hidden = !k;
    $("rank-models-options").hidden = k;
    // Inputs of the source not chosen are disabled so they are not validated.
    $("rank-model").disabled = !k;
    $("rank-k").disabled = !k;
    $("rank-models").querySelectorAll("input").forEach((c) => { c.disabled = k; });
  }
  $("rank-source-k").addEventListener("change", updateSource);
  $("rank-source-models").addEventListener("change", updateSource);
  updateSource();

  const labeler = $("rank-labeler");
  labeler.value = load(STORE_LABELER);
  labeler.addEventListener("input", () => save(STORE_LABELER, labeler.value.trim()));

  function setRanking(on) {
    $("rank-answers-box").hidden = !on;
    $("rank-sample").disabled = on || rank.busy;
    $("rank-prompt").readOnly = on; // the answers belong to this prompt
  }

  function clearAnswers() {
    rank.sample = null;
    $("rank-answers").replaceChildren();
    setRanking(false);
  }

  function showAnswers(sample) {
    const n = sample.answers.length;
    $("rank-answers").replaceChildren(...sample.answers.map((a, i) => {
      const card = document.createElement("li");
      card.className = "card";
      card.id = `answer-${letter(i)}`;
      card.dataset.testid = "answer-card";
      card.dataset.answerId = a.id;
      const title = document.createElement("h3");
      title.textContent = `Answer ${letter(i)}`;
      const text = document.createElement("div");
      text.className = "text";
      text.dataset.testid = "answer-text";
      text.textContent = a.text;
      const row = document.createElement("div");
      row.className = "rank";
      const label = document.createElement("label");
      label.htmlFor = `rank-select-${letter(i)}`;
      label.textContent = "Rank";
      const select = document.createElement("select");
      select.id = `rank-select-${letter(i)}`;
      select.dataset.testid = "rank-select";
      select.dataset.answerId = a.id;
      select.append(new Option("–", ""));
      for (let r = 1; r <= n; r++) select.append(new Option(r === 1 ? "1 (best)" : String(r), String(r)));
      select.addEventListener("change", () => {
        delete card.dataset.invalid;
        clearError(rankError);
      });
      row.append(label, select);
      card.append(title, text, row);
      return card;
    }));
    setRanking(true);
    $("rank-answers").querySelector("select").focus();
  }

  function sampleRequest() {
    const prompt = $("rank-prompt").value;
    const body = {
      messages: [{ role: "user", content: prompt }],
      temperature: numberOf("rank-temperature"),
      top_p: numberOf("rank-top-p"),
      max_tokens: numberOf("rank-max-tokens"),
    };
    if ($("rank-source-k").checked) {
      const k = numberOf("rank-k");
      if (!Number.isInteger(k) || k < K_MIN || k > K_MAX) {
        throw new Error(`K must be a whole number from ${K_MIN} to ${K_MAX}.`);
      }
      if (!$("rank-model").value) throw new Error("Choose a model.");
      body.model = $("rank-model").value;
      body.k = k;
    } else {
      const chosen = [...$("rank-models").querySelectorAll("input:checked")].map((c) => c.value);
      if (chosen.length < MODELS_MIN || chosen.length > MODELS_MAX) {
        throw new Error(`Choose ${MODELS_MIN} to ${MODELS_MAX} models (${chosen.length} chosen).`);
      }
      body.models = chosen;
    }
    return body;
  }

  async function getAnswers() {
    if (rank.busy || rank.sample) return;
    clearError(rankError);
    setRankStatus("idle", "");
    if (!$("rank-sample-form").reportValidity()) return;
    let body;
    try { body = sampleRequest(); } catch (e) { showError(rankError, e.message); return; }
    rank.busy = true;
    $("rank-sample").disabled = true;
    setRankStatus("sampling", "Sampling answers…");
    try {
      const sample = await (await api("v1/rankings/sample", { method: "POST", body })).json();
      if (!sample || !Array.isArray(sample.answers) || sample.answers.length < 2) {
        throw new ApiError("the server sent fewer than 2 answers");
      }
      rank.sample = sample;
      showAnswers(sample);
      setRankStatus("ranking", `${sample.answers.length} answers: rank them, then submit.`);
    } catch (e) {
      showError(rankError, e.message);
      setRankStatus("error", "");
    } finally {
      rank.busy = false;
      setRanking(rank.sample !== null);
    }
  }

  // {answer id: rank}, or an Error saying what is missing.
  function chosenRanks() {
    const ranks = {};
    const missing = [];
    $("rank-answers").querySelectorAll("select").forEach((select, i) => {
      if (select.value === "") {
        missing.push(letter(i));
        select.closest(".card").dataset.invalid = "true";
      } else {
        ranks[select.dataset.answerId] = Number(select.value);
      }
    });
    if (missing.length) return new Error(`Rank every answer (missing: ${missing.join(", ")}).`);
    if (new Set(Object.values(ranks)).size < 2) {
      return new Error("All answers are tied: rank at least one above another.");
    }
    return ranks;
  }

  async function submitRanking() {
    if (!rank.sample || rank.busy) return;
    clearError(rankError);
    if (!labeler.reportValidity()) return;
    const ranks = chosenRanks();
    if (ranks instanceof Error) { showError(rankError, ranks.message); return; }
    rank.busy = true;
    $("rank-submit").disabled = true;
    setRankStatus("submitting", "Saving…");
    try {
      const body = { id: rank.sample.id, labeler: labeler.value.trim(), ranks };
      const saved = await (await api("v1/rankings", { method: "POST", body })).json();
      clearAnswers();
      $("rank-prompt").value = "";
      $("rank-status").dataset.row = String(saved.row);
      setRankStatus("saved", `Saved as row ${saved.row}${saved.path ? ` of ${saved.path}` : ""}. Next prompt?`);
      $("rank-prompt").focus();
    } catch (e) {
      showError(rankError, e.message);
      setRankStatus("error", "");
    } finally {
      rank.busy = false;
      $("rank-submit").disabled = false;
      setRanking(rank.sample !== null);
    }
  }

  $("rank-sample-form").addEventListener("submit", (e) => {
    e.preventDefault();
    getAnswers();
  });
  $("rank-submit").addEventListener("click", submitRanking);
  $("rank-discard").addEventListener("click", () => {
    clearAnswers();
    clearError(rankError);
    setRankStatus("discarded", "Answers discarded.");
    $("rank-prompt").focus();
  });

  loadModels();
})();
