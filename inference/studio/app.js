// llamafleet studio: a small Vue 3 app served by the inference server at /studio/.
import { createApp } from "./vendor/vue.esm-browser.prod.js";
import { LLMClient } from "./services/llm.js";
import { KnowledgeClient } from "./services/knowledge.js";
import { chat, server, settings } from "./state.js";
import SettingsPanel from "./components/SettingsPanel.js";
import ChatPanel from "./components/ChatPanel.js";
import MetricsPanel from "./components/MetricsPanel.js";

const llm = new LLMClient({ baseUrl: "", apiKey: settings.apiKey });
const POLL_MS = 2000;

async function refreshServer() {
  try {
    const info = await llm.info();
    Object.assign(server, { running: info.running, queued: info.queued, queueSize: info.queue_size,
                            maxBatchSize: info.max_batch_size, ready: info.ready, error: "",
                            knowledgeUrl: info.studio ? info.studio.knowledge_url || "" : "" });
    chat.model = chat.model || info.model;
    const m = await llm.metrics();
    server.kvUsed = m.llamafleet_kv_cache_cells_used ?? null;
    server.kvTotal = m.llamafleet_kv_cache_cells_total ?? null;
  } catch (e) {
    Object.assign(server, { ready: false, error: `Server unreachable: ${e.message}` });
  }
}

const App = {
  components: { SettingsPanel, ChatPanel, MetricsPanel },
  data: () => ({ llm, server, knowledge: new KnowledgeClient("") }),
  async created() {
    await refreshServer();
    this.knowledge = new KnowledgeClient(server.knowledgeUrl);
    this.timer = setInterval(refreshServer, POLL_MS);
  },
  unmounted() { clearInterval(this.timer); },
  template: `
  <header class="top"><h1>llamafleet <span>studio</span></h1><span class="model">{{ server.ready ? 'model ready' : 'connecting…' }}</span></header>
  <div class="layout">
    <SettingsPanel :knowledge="knowledge" :key="knowledge.baseUrl" />
    <ChatPanel :llm="llm" />
    <MetricsPanel />
  </div>`,
};

createApp(App).mount("#app");
