// Application state, separate from components.
import { reactive } from "./vendor/vue.esm-browser.prod.js";

export const settings = reactive({
  systemPrompt: sessionStorage.getItem("lf.systemPrompt") || "You are a helpful assistant.",
  ragContext: "",
  temperature: 0.7,
  topP: 0.95,
  maxTokens: 256,
  seed: "",
  apiKey: sessionStorage.getItem("lf.apiKey") || "",
});

export const chat = reactive({
  messages: [],        // { role, content, error? }
  streaming: false,
  controller: null,
  model: "",
});

export const lastRun = reactive({
  ttftMs: null, tokensPerSecond: null, promptTokens: null, completionTokens: null,
  finishReason: null,
});

export const server = reactive({
  running: null, queued: null, maxBatchSize: null, queueSize: null, kvUsed: null,
  kvTotal: null, ready: false, error: "", knowledgeUrl: "",
});
