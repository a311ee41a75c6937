import { settings } from "../state.js";

export default {
  name: "SettingsPanel",
  props: { knowledge: { type: Object, required: true } },
  // On a phone the settings start folded so the chat is on the first screen.
  data: () => ({ settings, sources: [], sourcesError: "",
                 open: window.matchMedia("(min-width: 901px)").matches }),
  async mounted() {
    if (!this.knowledge.configured) return;
    try { this.sources = await this.knowledge.sources(); }
    catch (e) { this.sourcesError = e.message; }
  },
  watch: {
    "settings.systemPrompt"(v) { sessionStorage.setItem("lf.systemPrompt", v); },
    "settings.apiKey"(v) { sessionStorage.setItem("lf.apiKey", v); },
  },
  methods: {
    useSource(s) { this.settings.ragContext = s.text; },
  },
  template: `
  <aside class="panel settings">
    <details :open="open">
      <summary>Prompt &amp; sampling</summary>
      <label>System prompt
        <textarea data-testid="system-prompt" v-model="settings.systemPrompt" rows="4"></textarea>
      </label>
      <label>RAG context
        <textarea data-testid="rag-context" v-model="settings.ragContext" rows="6"
          placeholder="Facts the answer should use"></textarea>
      </label>
      <div v-if="knowledge.configured" class="sources">
        <h3>Knowledge sources</h3>
        <p v-if="sourcesError" class="error">{{ sourcesError }}</p>
        <button v-for="s in sources" :key="s.id" class="chip" @click="useSource(s)">{{ s.title }}</button>
      </div>
      <div class="grid2">
        <label>Temperature <input data-testid="temperature" type="number" min="0" max="2" step="0.1" v-model.number="settings.temperature"></label>
        <label>Top p <input data-testid="top-p" type="number" min="0.01" max="1" step="0.05" v-model.number="settings.topP"></label>
        <label>Max tokens <input data-testid="max-tokens" type="number" min="1" step="1" v-model.number="settings.maxTokens"></label>
        <label>Seed <input data-testid="seed" type="number" placeholder="random" v-model="settings.seed"></label>
      </div>
      <label>API key <input type="password" autocomplete="off" v-model="settings.apiKey" placeholder="only if the server needs one"></label>
    </details>
  </aside>`,
};
