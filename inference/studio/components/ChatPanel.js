import { chat, settings, lastRun } from "../state.js";
import { renderMarkdown } from "../markdown.js";

export default {
  name: "ChatPanel",
  props: { llm: { type: Object, required: true } },
  data: () => ({ chat, draft: "" }),
  methods: {
    html(text) { return renderMarkdown(text); },
    onKey(e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.send(); }
    },
    stop() { if (chat.controller) chat.controller.abort(); },
    clear() { if (!chat.streaming) chat.messages.splice(0); },
    async send() {
      const text = this.draft.trim();
      if (!text || chat.streaming) return;
      this.draft = "";
      const history = chat.messages.filter((m) => !m.error).map(({ role, content }) => ({ role, content }));
      chat.messages.push({ role: "user", content: text });
      const answer = { role: "assistant", content: "", error: "" };
      chat.messages.push(answer);
      const reply = chat.messages[chat.messages.length - 1];
      const body = {
        model: chat.model || undefined,
        messages: [
          ...(settings.systemPrompt.trim() ? [{ role: "system", content: settings.systemPrompt }] : []),
          ...history, { role: "user", content: text }],
        temperature: Number(settings.temperature), top_p: Number(settings.topP),
        max_tokens: Number(settings.maxTokens),
      };
      if (settings.ragContext.trim()) body.rag_context = settings.ragContext;
      if (settings.seed !== "" && settings.seed !== null) body.seed = Number(settings.seed);
      this.llm.apiKey = settings.apiKey;
      chat.controller = new AbortController();
      chat.streaming = true;
      const t0 = performance.now();
      let tFirst = null, chunks = 0;
      Object.assign(lastRun, { ttftMs: null, tokensPerSecond: null, promptTokens: null,
                               completionTokens: null, finishReason: null });
      try {
        const { finishReason, usage } = await this.llm.streamChat(body, {
          signal: chat.controller.signal,
          onDelta: (delta) => {
            if (tFirst === null) { tFirst = performance.now(); lastRun.ttftMs = tFirst - t0; }
            chunks += 1;
            reply.content += delta;
            this.$nextTick(() => this.scroll());
          },
        });
        const tEnd = performance.now();
        const tokens = usage ? usage.completion_tokens : chunks;
        lastRun.finishReason = finishReason;
        if (usage) { lastRun.promptTokens = usage.prompt_tokens; lastRun.completionTokens = usage.completion_tokens; }
        if (tFirst !== null && tEnd > tFirst && tokens > 1) {
          lastRun.tokensPerSecond = (tokens - 1) / ((tEnd - tFirst) / 1000);
        }
      } catch (e) {
        if (e.name === "AbortError") { lastRun.finishReason = "stopped"; }
        else { reply.error = e.message || String(e); }
      } finally {
        chat.streaming = false;
        chat.controller = null;
      }
    },
    scroll() { const el = this.$refs.log; if (el) el.scrollTop = el.scrollHeight; },
  },
  template: `
  <main class="panel chat">
    <div class="log" ref="log" aria-live="polite">
      <p v-if="!chat.messages.length" class="empty">Ask something. Enter sends, Shift+Enter starts a new line.</p>
      <div v-for="(m, i) in chat.messages" :key="i" :class="['msg', m.role]">
        <div class="role">{{ m.role === 'user' ? 'You' : 'Assistant' }}</div>
        <div v-if="m.role === 'assistant'" data-testid="assistant-message" class="markdown"
             :class="{ streaming: chat.streaming && i === chat.messages.length - 1 }" v-html="html(m.content)"></div>
        <div v-else class="plain">{{ m.content }}</div>
        <div v-if="m.error" class="error" data-testid="error-message">{{ m.error }}</div>
      </div>
    </div>
    <form class="composer" @submit.prevent="send">
      <textarea data-testid="chat-input" v-model="draft" rows="2" @keydown="onKey"
        placeholder="Message (Enter to send, Shift+Enter for a new line)"></textarea>
      <div class="buttons">
        <button v-if="!chat.streaming" data-testid="send" type="submit" :disabled="!draft.trim()">Send</button>
        <button v-else data-testid="stop" type="button" class="stop" @click="stop">Stop</button>
        <button type="button" class="ghost" @click="clear" :disabled="chat.streaming">Clear</button>
      </div>
    </form>
  </main>`,
};
