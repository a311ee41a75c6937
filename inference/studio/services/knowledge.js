// Client interface of the platform's knowledge service (RAG sources). The studio shows
// the sources panel only when a base URL is configured (LLM_LLAMA_SERVICE_STUDIO_KNOWLEDGE_URL).
// Expected API: GET {base}/v1/sources -> { data: [{ id, title, text }] }.

export class KnowledgeClient {
  constructor(baseUrl) {
    this.baseUrl = (baseUrl || "").replace(/\/$/, "");
  }

  get configured() {
    return Boolean(this.baseUrl);
  }

  async sources() {
    if (!this.configured) return [];
    const r = await fetch(`${this.baseUrl}/v1/sources`);
    if (!r.ok) throw new Error(`knowledge service answered HTTP ${r.status}`);
    return (await r.json()).data || [];
  }
}
