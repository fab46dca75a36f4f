// The staff chat page: plain fetch + ReadableStream over the same /v1 API teams use. No libraries.
(function () {
  "use strict";
  const form = document.getElementById("chat-form");
  const log = document.getElementById("chat-log");
  const input = document.getElementById("chat-input");
  const statusLine = document.getElementById("chat-status");
  const send = document.getElementById("chat-send");
  const csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;
  let key = null;
  let keyExpires = 0;
  let history = [];

  function add(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = (role === "user" ? "You: " : role === "error" ? "Error: " : "") + text;
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  async function chatKey(renew) {
    // Renew a little before expiry so a long answer never starts with a stale key.
    if (!renew && key && Date.now() < keyExpires - 30000) return key;
    const r = await fetch(form.dataset.keyUrl, {method: "POST", credentials: "same-origin",
                                                headers: {"X-CSRFToken": csrf}});
    if (!r.ok) throw new Error("could not get a console key (HTTP " + r.status + ")");
    const body = await r.json();
    key = body.key;
    keyExpires = Date.parse(body.expires_at);
    return key;
  }

  async function post(body, renew) {
    const k = await chatKey(renew);
    return fetch(form.dataset.apiUrl, {method: "POST", body: JSON.stringify(body),
      headers: {"Authorization": "Bearer " + k, "Content-Type": "application/json"}});
  }

  // Parse server-sent events ("data: {...}\n\n") as they arrive, calling onData for each payload.
  async function readEvents(response, onData) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data:")) onData(line.slice(5).trim());
        }
      }
    }
  }

  async function ask(text) {
    history.push({role: "user", content: text});
    add("user", text);
    const out = add("assistant", "");
    const body = {model: document.getElementById("chat-model").value, messages: history, stream: true,
                  stream_options: {include_usage: true},
                  max_tokens: parseInt(document.getElementById("chat-max-tokens").value, 10) || 64,
                  temperature: parseFloat(document.getElementById("chat-temperature").value) || 0};
    statusLine.textContent = "waiting for the first token…";
    let response = await post(body, false);
    if (response.status === 401) response = await post(body, true);  // the key expired or was revoked
    if (!response.ok) {
      const problem = await response.json().catch(() => null);
      out.remove();
      history.pop();
      add("error", (problem && problem.error ? problem.error.message : "HTTP " + response.status) +
          " (HTTP " + response.status + ")");
      statusLine.textContent = "";
      return;
    }
    let answer = "";
    await readEvents(response, (data) => {
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) { add("error", obj.error.message); return; }
      const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        out.textContent = answer;
        statusLine.textContent = "streaming…";
      }
      if (obj.usage) {
        statusLine.textContent = obj.usage.prompt_tokens + " prompt + " + obj.usage.completion_tokens +
                                 " completion tokens";
      }
    });
    history.push({role: "assistant", content: answer});
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    send.disabled = true;
    try {
      await ask(text);
    } catch (err) {
      add("error", String(err));
      statusLine.textContent = "";
    } finally {
      send.disabled = false;
      input.focus();
    }
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  document.getElementById("chat-reset").addEventListener("click", () => {
    history = [];
    log.textContent = "";
    statusLine.textContent = "";
  });
})();
