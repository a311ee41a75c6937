"""What tests of every part share: one module per real component, plus the fakes that several
test files use. The pytest fixtures built on them are in tests/conftest.py.

- ``servers``: `llamafleet serve` (in a thread or as a process) and `llamafleet router` on
  loopback, free ports, raw HTTP exchanges, ``wait_until``.
- ``kube``: KMock's Kubernetes API emulator with what it lacks, kopf in a worker thread
  (``kopf_runner``, loading ``kopf_app``), a router pointed at the emulator; ``rbac`` (the API
  server's RBAC authorizer) and ``rbac_audit`` (the audit of the kopf + KMock suites).
- ``browser``: Debian's chromium through Playwright, by executable path.
- Prometheus: no test runs a real Prometheus yet. Its home will be ``prometheus.py`` here
  (Debian's ``prometheus`` package and ``promtool``, see docs/testing.md).
- Fakes at our own boundaries: ``fake_backend`` (the engine's model boundary), ``scripted``
  (the pod's app over a scripted backend), ``fake_nvml`` (NVML).
"""
