#!/usr/bin/env bash
# Create .venv at the repo root if missing and install the project into it for the accelerator this
# machine has. Sourced by run.sh and test.sh; run it directly to (re)install.
#
# The choice: nvidia-smi answers -> CUDA torch and jax[cuda13] (the driver supports CUDA 13, i.e.
# driver >= 580) or jax[cuda12] (CUDA 12, driver >= 525); a TPU VM (/dev/accel*, a TPU on the PCI
# bus, or TPU_ACCELERATOR_TYPE/TPU_WORKER_HOSTNAMES set) -> jax[tpu] and CPU torch; otherwise CPU torch
# and CPU jax. torch comes from PyTorch's wheel index for that build when it answers within 2 s,
# else from the default index. Idempotent: the stamp .venv/.sae-music-install records pyproject.toml's
# hash, the accelerator and the JAX-only choice; a change in any of them reinstalls.
#
#   SAE_MUSIC_ACCEL=cpu|cuda12|cuda13|tpu  use this accelerator instead of the detected one
#   SAE_MUSIC_JAX_ONLY=1                   leave out torch and transformers (the extract extra)
#   SAE_MUSIC_INSTALL_DRY_RUN=1            print the plan and the pip commands; change nothing
#   SAE_MUSIC_TORCH_INDEX=URL              base of PyTorch's wheel indexes (a mirror); default below
#   SAE_MUSIC_PROBE_ROOT=DIR               look for TPU devices under DIR/dev and DIR/sys (tests)
#   PYTHON=python3.12                      the interpreter that creates .venv (>= 3.11)
set -euo pipefail

SAE_TORCH_VERSION=2.13.0
SAE_TORCH_INDEX_DEFAULT=https://download.pytorch.org/whl
# PCI device ids of TPU chips (vendor 0x1ae0, Google), as jax/_src/hardware_utils.py lists them.
SAE_TPU_PCI_IDS="0x0027 0x0056 0x005e 0x0062 0x0063 0x006f 0x0076"

sae_say() { echo "install: $*"; }

sae_run() {  # run a command, or in a dry run print it
  if [ "$sae_dry_run" = 1 ]; then echo "+ $*"; else "$@"; fi
}

sae_with_timeout() {  # seconds, command...: coreutils timeout where there is one
  local seconds=$1
  shift
  if command -v timeout >/dev/null 2>&1; then timeout "$seconds" "$@"; else "$@"; fi
}

sae_detect_gpu() {  # an NVIDIA GPU JAX can use: sets sae_accel and sae_why; else sets sae_no_gpu
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  local out driver cuda seen
  if ! out=$(sae_with_timeout 30 nvidia-smi 2>&1); then
    sae_no_gpu="nvidia-smi failed: $(head -n 1 <<<"$out")"
    return 1
  fi
  driver=$(grep -o 'Driver Version: *[0-9][0-9.]*' <<<"$out" | head -n 1 | grep -o '[0-9][0-9.]*$' || true)
  cuda=$(grep -o 'CUDA Version: *[0-9][0-9.]*' <<<"$out" | head -n 1 | grep -o '[0-9][0-9.]*$' || true)
  seen="nvidia-smi: driver ${driver:-?}, CUDA ${cuda:-?}"
  if [ -n "$cuda" ]; then
    if [ "${cuda%%.*}" -ge 13 ]; then sae_accel=cuda13
    elif [ "${cuda%%.*}" -eq 12 ]; then sae_accel=cuda12
    fi
  elif [ -n "$driver" ]; then
    if [ "${driver%%.*}" -ge 580 ]; then sae_accel=cuda13
    elif [ "${driver%%.*}" -ge 525 ]; then sae_accel=cuda12
    fi
  else
    sae_no_gpu="nvidia-smi printed no driver or CUDA version"
    return 1
  fi
  case "${sae_accel:-}" in
    cuda13) sae_why="$seen" ;;
    cuda12) sae_why="$seen; jax[cuda13] needs CUDA 13, driver >= 580" ;;
    *) sae_no_gpu="$seen, too old for JAX (CUDA 12 needs driver >= 525)"; return 1 ;;
  esac
}

sae_detect_tpu() {  # a TPU VM: sets sae_accel and sae_why
  local probe="${SAE_MUSIC_PROBE_ROOT:-}" path
  for path in "$probe"/dev/accel[0-9]*; do
    if [ -e "$path" ]; then sae_accel=tpu; sae_why="TPU device ${path#"$probe"}"; return 0; fi
  done
  for path in "$probe"/sys/bus/pci/devices/*; do
    [ "$(cat "$path/vendor" 2>/dev/null)" = 0x1ae0 ] || continue
    if [[ " $SAE_TPU_PCI_IDS " == *" $(cat "$path/device" 2>/dev/null) "* ]]; then
      sae_accel=tpu; sae_why="a TPU chip on the PCI bus (${path##*/})"; return 0
    fi
  done
  if [ -n "${TPU_ACCELERATOR_TYPE:-}${TPU_WORKER_HOSTNAMES:-}" ]; then
    sae_accel=tpu; sae_why="TPU_ACCELERATOR_TYPE/TPU_WORKER_HOSTNAMES set"; return 0
  fi
  return 1
}

sae_choose_accelerator() {  # sets sae_accel and sae_why
  sae_accel="" sae_why="" sae_no_gpu=""
  if [ -n "${SAE_MUSIC_ACCEL:-}" ]; then
    case "$SAE_MUSIC_ACCEL" in
      cpu | cuda12 | cuda13 | tpu) sae_accel=$SAE_MUSIC_ACCEL; sae_why="SAE_MUSIC_ACCEL=$SAE_MUSIC_ACCEL" ;;
      *) echo "error: SAE_MUSIC_ACCEL=$SAE_MUSIC_ACCEL is not one of cpu, cuda12, cuda13, tpu" >&2; exit 2 ;;
    esac
  elif sae_detect_gpu || sae_detect_tpu; then
    :
  else
    sae_accel=cpu
    sae_why="${sae_no_gpu:-no nvidia-smi}, no TPU devices"
  fi
}

sae_index_answers() {  # url: does it answer within 2 s (without waiting on a dead network)?
  sae_with_timeout 3 "$sae_python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "$1" >/dev/null 2>&1
}

sae_choose_torch() {  # sets sae_torch_index (empty: the default index) and sae_torch_note
  local base="${SAE_MUSIC_TORCH_INDEX:-$SAE_TORCH_INDEX_DEFAULT}" flavour build
  base=${base%/}
  case "$sae_accel" in
    cuda12) flavour=cu126; build="CUDA 12.6 build" ;;
    cuda13) flavour=cu130; build="CUDA 13.0 build" ;;
    *) flavour=cpu; build="CPU build" ;;
  esac
  sae_torch_index=""
  if sae_index_answers "$base/$flavour/"; then
    sae_torch_index="$base/$flavour"
    sae_torch_note="torch $SAE_TORCH_VERSION, $build, from $sae_torch_index"
    return
  fi
  sae_torch_note="torch $SAE_TORCH_VERSION from the default index ($base/$flavour/ did not answer)"
  case "$flavour" in
    cpu) sae_torch_note+="; from PyPI on Linux that build bundles CUDA 13.0 libraries (a few GB, unused here)" ;;
    cu130) sae_torch_note+="; from PyPI on Linux that is the CUDA 13.0 build" ;;
    cu126) sae_torch_note+="; from PyPI on Linux that is the CUDA 13.0 build, which this driver cannot run, so torch"
      sae_torch_note+=" will use the CPU: set SAE_MUSIC_TORCH_INDEX to a mirror with cu126 for a GPU torch" ;;
  esac
}

sae_stamp_value() {  # key: its value in the recorded stamp, or nothing
  [ -f "$sae_stamp" ] || return 0
  tr ' ' '\n' <"$sae_stamp" | sed -n "s/^$1=//p"
}

sae_install() {
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cd "$root"
  sae_dry_run="${SAE_MUSIC_INSTALL_DRY_RUN:-0}"
  sae_python="${PYTHON:-python3}"
  sae_stamp=.venv/.sae-music-install
  local jax_only="${SAE_MUSIC_JAX_ONLY:-0}" pip=(.venv/bin/python -m pip) stamp before_accel before_jax_only
  [ "$jax_only" = 1 ] || jax_only=0
  sae_choose_accelerator
  stamp="pyproject=$(sha256sum pyproject.toml | cut -c1-16) accel=$sae_accel jax_only=$jax_only"
  if [ -f "$sae_stamp" ] && [ "$(cat "$sae_stamp")" = "$stamp" ]; then
    [ "$sae_dry_run" = 1 ] && sae_say "nothing to do: .venv is installed for $sae_accel (jax_only=$jax_only)"
    return 0
  fi
  before_accel=$(sae_stamp_value accel)
  before_jax_only=$(sae_stamp_value jax_only)

  local extras=(dev) torch_line
  if [ "$jax_only" = 1 ]; then
    torch_line="torch left out (SAE_MUSIC_JAX_ONLY=1): extraction, audio and the .pt export need"
    torch_line+=" pip install -e '.[extract]'"
  else
    extras=(extract dev)
    sae_choose_torch
    torch_line=$sae_torch_note
  fi
  [ "$sae_accel" = cpu ] || extras+=("$sae_accel")
  sae_say "accelerator $sae_accel ($sae_why)"
  sae_say "$torch_line"

  if [ ! -x .venv/bin/python ]; then
    if ! "$sae_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "error: sae-music-jax needs Python >= 3.11 (jax >= 0.8.2); $sae_python is" \
        "$("$sae_python" --version 2>&1 || echo missing): set PYTHON to a newer one" >&2
      exit 1
    fi
    sae_say "creating .venv with $("$sae_python" --version 2>&1)"
    sae_run "$sae_python" -m venv .venv
  fi
  # What the former choice installed and this one must not keep: the other accelerator's builds
  # (torch's build is chosen per accelerator), or the extract extra on a host now JAX-only.
  local stale=()
  if [ -n "$before_accel" ] && [ "$before_accel" != "$sae_accel" ]; then
    sae_say "reinstalling: .venv was installed for $before_accel"
    stale+=(torch jax-cuda12-plugin jax-cuda12-pjrt jax-cuda13-plugin jax-cuda13-pjrt libtpu)
  elif [ -n "$before_accel" ]; then
    sae_say "reinstalling: pyproject.toml or the JAX-only choice changed"
  fi
  if [ "$jax_only" = 1 ] && [ "$before_jax_only" = 0 ]; then
    [ ${#stale[@]} -gt 0 ] || stale+=(torch)
    stale+=(transformers tokenizers)
  fi
  # -qq: no warning for each of them that is not installed
  [ ${#stale[@]} -eq 0 ] || sae_run "${pip[@]}" uninstall -qq -y "${stale[@]}"
  sae_say "installing sae-music-jax[$(IFS=,; echo "${extras[*]}")] into .venv (a few minutes)"
  sae_run "${pip[@]}" install -q --upgrade pip
  if [ "$jax_only" = 0 ]; then
    # First, so that the extract extra's torch>=2.2 finds this build installed and keeps it.
    if [ -n "$sae_torch_index" ]; then
      sae_run "${pip[@]}" install -q "torch==$SAE_TORCH_VERSION" --index-url "$sae_torch_index"
    else
      sae_run "${pip[@]}" install -q "torch==$SAE_TORCH_VERSION"
    fi
  fi
  sae_run "${pip[@]}" install -q -e ".[$(IFS=,; echo "${extras[*]}")]"
  if [ "$sae_dry_run" = 1 ]; then
    sae_say "would record $sae_stamp: $stamp"
  else
    rm -f .venv/.installed-*  # stamps of the former installer
    echo "$stamp" >"$sae_stamp"
  fi
}

sae_install
