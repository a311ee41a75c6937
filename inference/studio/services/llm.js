// Client of the llamafleet LLM API (OpenAI-compatible). One client per backend lives in
// services/; components never call fetch themselves.

export class LLMClient {
  constructor({ baseUrl = "", apiKey = "" } = {}) {
    this.baseUrl = baseUrl.replace(/\/$/, "");
    this.apiKey = apiKey;
  }

  headers() {
    const h = { "Content-Type": "application/json" };
    if (this.apiKey) h.Authorization = `Bearer ${this.apiKey}`;
    return h;
  }

  async models() {
    const r = await fetch(`${this.baseUrl}/v1/models`, { headers: this.headers() });
    if (!r.ok) throw await apiError(r);
    return (await r.json()).data;
  }

  async info() {
    const r = await fetch(`${this.baseUrl}/info`, { headers: this.headers() });
    if (!r.ok) throw await apiError(r);
    return r.json();
  }

  // Prometheus text -> { series_name: value } for unlabelled series.
  async metrics() {
    const r = await fetch(`${this.baseUrl}/metrics`, { headers: this.headers() });
    if (!r.ok) throw await apiError(r);
    const out = {};
    for (const line of (await r.text()).split("\n")) {
      const m = /^([a-z_:]+)\s+([0-9.eE+-]+)$/.exec(line);
      if (m) out[m[1]] = Number(m[2]);
    }
    return out;
  }

  // Streams a chat completion. Calls onDelta(text) per chunk and returns
  // { finishReason, usage } at [DONE]. Abort with the signal (Stop button).
  async streamChat(body, { signal, onDelta }) {
    const r = await fetch(`${this.baseUrl}/v1/chat/completions`, {
      method: "POST", headers: this.headers(), signal,
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    });
    if (!r.ok) throw await apiError(r);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finishReason = null, usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return { finishReason, usage };
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          if (obj.usage) usage = obj.usage;
          for (const choice of obj.choices || []) {
            if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
            if (choice.finish_reason) finishReason = choice.finish_reason;
          }
        }
      }
    }
    return { finishReason, usage };
  }
}

async function apiError(r) {
  try {
    const body = await r.json();
    if (body.error) return new Error(`${body.error.message} (HTTP ${r.status})`);
  } catch (_) { /* not JSON */ }
  return new Error(`The server answered HTTP ${r.status}.`);
}
