#!/usr/bin/env bash
# Refresh the vendored browser builds from the npm registry (pinned versions), with their
# licences. Run by hand when upgrading; the server and the README commands never need Node.
set -euo pipefail
cd "$(dirname "$0")"
VUE=3.5.45 MARKED=15.0.12 DOMPURIFY=3.4.18
tmp=$(mktemp -d)
(cd "$tmp" && npm pack --silent "vue@$VUE" "marked@$MARKED" "dompurify@$DOMPURIFY" >/dev/null)
for t in "$tmp"/*.tgz; do mkdir -p "${t%.tgz}" && tar xzf "$t" -C "${t%.tgz}"; done
cp "$tmp/vue-$VUE/package/dist/vue.esm-browser.prod.js" .
cp "$tmp/marked-$MARKED/package/lib/marked.esm.js" .
# .js, not .mjs: every static server sends .js as JavaScript
cp "$tmp/dompurify-$DOMPURIFY/package/dist/purify.es.mjs" purify.es.js
cp "$tmp/vue-$VUE/package/LICENSE" LICENSE.vue
cp "$tmp/marked-$MARKED/package/LICENSE.md" LICENSE.marked
cp "$tmp/dompurify-$DOMPURIFY/package/LICENSE" LICENSE.dompurify
rm -rf "$tmp"
