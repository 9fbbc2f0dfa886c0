#!/usr/bin/env bash
# Serves a charlstm export with the tensorflow/serving Docker image.
#
# The image's entry point starts tensorflow_model_server with --port=8500,
# --rest_api_port=8501, --model_name=$MODEL_NAME and
# --model_base_path=/models/$MODEL_NAME, and passes this script's extra
# arguments on to the server.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/serve.sh --export_dir=DIR [options] [-- extra tensorflow_model_server flags]

Runs the tensorflow/serving container on an export directory, the parent of
the integer version directories that export_saved_model writes. TF Serving
loads the highest version and picks up new ones as they appear.

Options:
  --export_dir=DIR        export directory (required), mounted read-only
  --model_name=NAME       model name for clients (default: charlstm)
  --grpc_port=PORT        host port for gRPC (default: 8500)
  --rest_port=PORT        host port for REST (default: 8501)
  --image=IMAGE           Docker image (default: tensorflow/serving:latest;
                          --gpu switches the default to tensorflow/serving:latest-gpu)
  --batching_config=FILE  server-side batching parameters (text proto); by default
                          a config with max_batch_size 64 and a 2 ms timeout is
                          written to $TMPDIR/charlstm-serving/batching.config
  --no_batching           serve without --enable_batching
  --no_xla                serve without --xla_cpu_compilation_enabled, the flag
                          that lets TF Serving JIT-compile XLA functions on CPU;
                          clients should then use step_no_xla and step_chars_no_xla
  --gpu                   pass all GPUs to the container (needs the NVIDIA
                          container toolkit)
  --print                 print the docker command instead of running it
  -h, --help              show this help
EOF
}

fail() {
  echo "serve.sh: $*" >&2
  exit 2
}

export_dir=""
model_name="charlstm"
grpc_port=8500
rest_port=8501
image=""
batching_config=""
batching=1
xla=1
gpu=0
print_only=0
extra_args=()

while (($#)); do
  case "$1" in
    --export_dir=*) export_dir="${1#*=}" ;;
    --model_name=*) model_name="${1#*=}" ;;
    --grpc_port=*) grpc_port="${1#*=}" ;;
    --rest_port=*) rest_port="${1#*=}" ;;
    --image=*) image="${1#*=}" ;;
    --batching_config=*) batching_config="${1#*=}" ;;
    --no_batching) batching=0 ;;
    --no_xla) xla=0 ;;
    --gpu) gpu=1 ;;
    --print) print_only=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra_args=("$@"); break ;;
    *) usage >&2; fail "unknown argument '$1'; options take the form --name=value." ;;
  esac
  shift
done

[[ -n "$export_dir" ]] || fail "--export_dir is required: the directory that holds the integer version directories."
[[ -d "$export_dir" ]] || fail "--export_dir=$export_dir not found."
export_dir="$(cd "$export_dir" && pwd -P)"
has_version=0
for version_dir in "$export_dir"/*/; do
  name="$(basename "$version_dir")"
  if [[ "$name" =~ ^[0-9]+$ && -f "$version_dir/saved_model.pb" ]]; then
    has_version=1
  fi
done
if ((has_version == 0)); then
  if [[ -f "$export_dir/saved_model.pb" ]]; then
    fail "--export_dir=$export_dir is a version directory; pass its parent, which TF Serving scans for versions."
  fi
  fail "--export_dir=$export_dir has no integer version directory with saved_model.pb; run the export first."
fi
[[ "$model_name" =~ ^[A-Za-z0-9_.-]+$ ]] || fail "--model_name=$model_name must use only letters, digits, '_', '.' and '-'."
for port in "$grpc_port" "$rest_port"; do
  [[ "$port" =~ ^[0-9]+$ ]] && ((port >= 1 && port <= 65535)) || fail "port '$port' must be an integer in [1, 65535]."
done
[[ "$grpc_port" != "$rest_port" ]] || fail "--grpc_port and --rest_port must differ, both are $grpc_port."

if [[ -z "$image" ]]; then
  if ((gpu)); then image="tensorflow/serving:latest-gpu"; else image="tensorflow/serving:latest"; fi
fi

command=(docker run --rm --init
  -p "${grpc_port}:8500" -p "${rest_port}:8501"
  --mount "type=bind,source=${export_dir},target=/models/${model_name},readonly"
  -e "MODEL_NAME=${model_name}")
((gpu)) && command+=(--gpus all)

server_args=()
((xla)) && server_args+=(--xla_cpu_compilation_enabled=true)
if ((batching)); then
  if [[ -z "$batching_config" ]]; then
    batching_config="${TMPDIR:-/tmp}/charlstm-serving/batching.config"
    mkdir -p "$(dirname "$batching_config")"
    # Rows of one request stay together; the server merges requests up to
    # max_batch_size rows, waiting at most batch_timeout_micros for more.
    cat > "$batching_config" <<'EOF'
max_batch_size { value: 64 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 4 }
EOF
  fi
  [[ -f "$batching_config" ]] || fail "--batching_config=$batching_config not found."
  batching_config="$(cd "$(dirname "$batching_config")" && pwd -P)/$(basename "$batching_config")"
  command+=(--mount "type=bind,source=${batching_config},target=/config/batching.config,readonly")
  server_args+=(--enable_batching=true --batching_parameters_file=/config/batching.config)
fi

command+=("$image" "${server_args[@]}" "${extra_args[@]}")

if ((print_only)); then
  printf '%q ' "${command[@]}"
  printf '\n'
  exit 0
fi
command -v docker >/dev/null || fail "docker not found on PATH; install Docker or use --print to see the command."
echo "Serving $export_dir as '$model_name': gRPC on port $grpc_port, REST on port $rest_port." >&2
exec "${command[@]}"
