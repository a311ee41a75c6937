import { lastRun, server } from "../state.js";

const fmt = (v, digits = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

export default {
  name: "MetricsPanel",
  data: () => ({ lastRun, server }),
  methods: { fmt },
  template: `
  <aside class="panel metrics">
    <h2>Last answer</h2>
    <dl>
      <dt>Time to first token</dt><dd data-testid="metric-ttft">{{ fmt(lastRun.ttftMs) }}<small> ms</small></dd>
      <dt>Tokens / s</dt><dd data-testid="metric-tps">{{ fmt(lastRun.tokensPerSecond, 1) }}</dd>
      <dt>Prompt tokens</dt><dd data-testid="metric-prompt-tokens">{{ fmt(lastRun.promptTokens) }}</dd>
      <dt>Completion tokens</dt><dd data-testid="metric-completion-tokens">{{ fmt(lastRun.completionTokens) }}</dd>
      <dt>Finish</dt><dd>{{ lastRun.finishReason || '–' }}</dd>
    </dl>
    <h2>Server <span :class="['dot', server.ready ? 'ok' : 'bad']"></span></h2>
    <p v-if="server.error" class="error">{{ server.error }}</p>
    <dl>
      <dt>Running sequences</dt><dd data-testid="server-running">{{ fmt(server.running) }}</dd>
      <dt>Queued</dt><dd data-testid="server-queued">{{ fmt(server.queued) }} <small>/ {{ fmt(server.queueSize) }}</small></dd>
      <dt>max_batch_size</dt><dd data-testid="server-max-batch">{{ fmt(server.maxBatchSize) }}</dd>
      <dt>KV cache</dt><dd>{{ fmt(server.kvUsed) }} <small>/ {{ fmt(server.kvTotal) }} cells</small></dd>
    </dl>
  </aside>`,
};
