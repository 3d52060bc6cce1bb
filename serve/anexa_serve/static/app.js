// The chat page: plain JS, no build step. Talks to this server's OpenAI-compatible API and shows the
// streamed tokens as they arrive. Model text is only ever inserted with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // chat mode: {role, content}
let controller = null;

function showError(message) { $("error").textContent = message || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) { showError("could not list models: " + await errorMessage(response)); return; }
    const body = await response.json();
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren();
    for (const model of body.data) {
      const option = document.createElement("option");
      option.value = option.textContent = model.id;
      option.dataset.sampling = ((model.anexa && model.anexa.sampling) || []).join(", ");
      select.append(option);
    }
    if (chosen) select.value = chosen;
    showSampling();
    select.dataset.loaded = "true";
  } catch (e) {
    showError("could not reach the server: " + e.message);
  }
}

// A model whose makers recommend a sampling gets it when temperature, top p and samplers are all left empty.
function showSampling() {
  const option = $("model").selectedOptions[0];
  const recommended = option ? option.dataset.sampling : "";
  $("temperature").placeholder = recommended ? "model's" : "1.0";
  $("top-p").placeholder = recommended ? "model's" : "off";
  $("samplers").placeholder = recommended ? "model's: " + recommended : "top_k=40, repetition_penalty=1.2";
}

function follow() { const log = $("log"); log.scrollTop = log.scrollHeight; }

function addMessage(kind, label, text) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  div.dataset.label = label;
  div.textContent = text;
  $("log").append(div);
  follow();
  return div;
}

function number(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

function buildRequest(mode, prompt) {
  const body = { model: $("model").value, stream: true, stream_options: { include_usage: true } };
  const maxTokens = number("max-tokens", (v) => parseInt(v, 10));
  const temperature = number("temperature", parseFloat);
  const topP = number("top-p", parseFloat);
  const seed = number("seed", (v) => parseInt(v, 10));
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if (temperature !== undefined) body.temperature = temperature;
  if (topP !== undefined) body.top_p = topP;
  if (seed !== undefined) body.seed = seed;
  const stop = $("stop").value;
  if (stop !== "") body.stop = stop.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
  const samplers = $("samplers").value.split(/[,\s]+/).filter(Boolean);
  if (samplers.length) body.anexa = { samplers };
  if (mode === "chat") body.messages = conversation.slice();
  else body.prompt = prompt;
  return body;
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt || controller) return;
  showError("");
  const mode = $("mode").value;
  let question, answer;
  if (mode === "chat") {
    conversation.push({ role: "user", content: prompt });
    question = addMessage("user", "User", prompt);
    answer = addMessage("assistant", "Assistant", "");
  } else {
    question = addMessage("user prompt", "Prompt", prompt);
    answer = addMessage("assistant", "Continuation", "");
  }
  $("prompt").value = "";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop-button").disabled = false;
  $("status").textContent = "generating…";
  const started = performance.now();
  let usage = null, finish = null;
  try {
    const path = mode === "chat" ? "/v1/chat/completions" : "/v1/completions";
    const response = await fetch(path, {
      method: "POST", headers: headers(), body: JSON.stringify(buildRequest(mode, prompt)), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          const text = mode === "chat" ? choice.delta.content : choice.text;
          if (text) { answer.textContent += text; follow(); }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    if (mode === "chat") conversation.push({ role: "assistant", content: answer.textContent });
    const seconds = (performance.now() - started) / 1000;
    $("status").textContent = usage
      ? `${usage.prompt_tokens} prompt tokens, ${usage.completion_tokens} generated (${(usage.completion_tokens / seconds).toFixed(0)}/s), finish: ${finish}`
      : `finish: ${finish}`;
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
      if (mode === "chat") conversation.push({ role: "assistant", content: answer.textContent });
    } else {
      showError(e.message);
      $("status").textContent = "";
      if (!answer.textContent) {
        // Refused before any text: take the message back so it can be edited and sent again.
        if (mode === "chat") conversation.pop();
        question.remove();
        answer.remove();
        if (!$("prompt").value) $("prompt").value = prompt;
      } else if (mode === "chat") {
        conversation.push({ role: "assistant", content: answer.textContent });
      }
    }
  } finally {
    answer.dataset.done = "true";
    controller = null;
    $("send").disabled = false;
    $("stop-button").disabled = true;
  }
}

$("form").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop-button").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { conversation.length = 0; $("log").replaceChildren(); showError(""); $("status").textContent = ""; });
$("api-key").addEventListener("change", loadModels);
$("model").addEventListener("change", showSampling);
loadModels();
