.PHONY: serve test e2e bench docker
serve:        ## set up and serve the embedded chat model (studio at /studio/)
	./scripts/serve.sh
test:         ## set up and run every test (what CI runs)
	./scripts/test.sh
e2e:          ## kind cluster end-to-end (needs docker + kind)
	./scripts/e2e-kind.sh
bench:        ## side-by-side CPU benchmark (builds llama-server once)
	./benchmarks/build_llama_server.sh && .venv/bin/python benchmarks/compare.py
docker:       ## build and smoke-test the CPU image
	./scripts/docker-smoke.sh
