# Sourced by every script that compiles llama.cpp (scripts/build-llama-cpp-python.sh,
# benchmarks/build_llama_server.sh, benchmarks/gpu/*): compiler flags all our builds share.
#
# No AMX kernels. At the llama.cpp commit that llama-cpp-python 0.3.36 vendors, a build that
# targets an AMX CPU (GGML_NATIVE on a Sapphire/Granite Rapids Xeon) moves Q4_0/Q4_1/Q8_0/Q4_K/
# Q5_K/Q6_K/IQ4_XS weights into the "AMX" buffer type, and its ggml_backend_amx_mul_mat
# (ggml-cpu/amx/mmq.cpp) segfaults on the first decode on virtualised hosts (upstream
# llama.cpp#20824, ollama#17205/#17249). Leaving only AMX out keeps every other fast path:
# AVX-512/VNNI kernels and CPU weight repacking. See docs/llama-cpp.md.
case "$(uname -m)" in
  x86_64|amd64) LLAMAFLEET_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
  *) LLAMAFLEET_CFLAGS="" ;;
esac
export CFLAGS="${CFLAGS:+$CFLAGS }$LLAMAFLEET_CFLAGS"
export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$LLAMAFLEET_CFLAGS"
