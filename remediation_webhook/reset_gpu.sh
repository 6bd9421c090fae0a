# The reset_gpu executor Job's script (run as /bin/sh -c <this> gpu-health-reset <GPU UUID>); docs/reset.md is
# the procedure it follows. Exit codes: 2 bad argument, 10 a holder that nobody paused, 11 MIG enabled, 12 GPU not
# found or another UUID answers, 13 nvidia-smi -r failed, 14 the platform needs a reboot, 15 a check after the
# reset failed. Every step, with its time, is printed and written to the termination log, which the webhook
# journals. The paths come from the Job's environment so that the simulator can point them at its node.
set -u
set -f  # no pathname expansion of anything read (process names are any process's choice)
uuid="${1:-}"
dev="${GPU_HEALTH_DEV:-/dev}"
# /proc/<pid>/fd shows resolved paths: compare against the resolved directory.
dev=$(cd "$dev" 2> /dev/null && pwd -P) || dev="${GPU_HEALTH_DEV:-/dev}"
st="${GPU_HEALTH_EXPORTER_STATE:-/exporter-state}"
drv="${GPU_HEALTH_DRIVER_ROOT:-/host/run/nvidia/driver}"
tlog="${GPU_HEALTH_TERMINATION_LOG:-/dev/termination-log}"
release_wait="${GPU_HEALTH_RELEASE_WAIT:-30}"
fabric_wait="${GPU_HEALTH_FABRIC_WAIT:-120}"
t0=$(date +%s.%N)
report=""
pm_off=""
released=""

step() {
  t=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  report="$report[$t s] $*
"
  echo "[$t s] $*"
}
finish() {
  code=$1; shift
  step "$*"
  # Persistence mode back on before the log is written, so that a failure to do it is in the journal too.
  if [ -n "$pm_off" ]; then
    pm_off=""
    if smi -pm 1 -i "$uuid" > /dev/null 2>&1; then
      step "persistence mode on again"
    else
      step "could not turn persistence mode back on for $uuid: turn it on by hand (nvidia-smi -pm 1 -i $uuid)"
      [ "$code" -ne 0 ] || code=15
    fi
  fi
  { printf '%s' "$report" | tail -c 3800 > "$tlog"; } 2> /dev/null || true
  exit "$code"
}
cleanup() {
  if [ -n "$released" ]; then rm -f "$st/release-nvml"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT
case "$uuid" in GPU-*) ;; *) finish 2 "not a GPU UUID";; esac
case "$uuid" in *[!A-Za-z0-9-]*) finish 2 "not a GPU UUID";; esac

# With the GPU Operator the driver and nvidia-smi live in the driver container's root.
if [ -x "$drv/usr/bin/nvidia-smi" ]; then
  smi() { chroot "$drv" nvidia-smi "$@"; }
  step "nvidia-smi from the driver root $drv"
else
  smi() { nvidia-smi "$@"; }
  step "nvidia-smi from the host driver"
fi
# One value of `nvidia-smi -q`: "Key" at the GPU's level, "Section/Key" one level down.
field() {
  printf '%s\n' "$info" | awk -v want="$1" '
    { match($0, /^ */); ind = RLENGTH; s = substr($0, ind + 1) }
    ind == 4 && index(s, ":") == 0 { sec = s; sub(/ +$/, "", sec); next }
    ind == 4 { sec = "" }
    ind <= 8 && index(s, ":") {
      k = s; sub(/ *:.*/, "", k); v = s; sub(/^[^:]*: */, "", v)
      if ((ind == 8 && sec != "" ? sec "/" k : k) == want) { print v; exit }
    }'
}
running() {
  want=$1
  set +f
  set -- /proc/[0-9]*/comm
  set -f
  for c in "$@"; do
    IFS= read -r n < "$c" 2> /dev/null && [ "$n" = "$want" ] && return 0
  done
  return 1
}
# pid:name of every process with the GPU's device file open, this script's own processes aside.
holders() {
  set +f
  set -- /proc/[0-9]*/fd
  set -f
  find "$@" -maxdepth 1 -lname "$dev/nvidia$minor" 2> /dev/null | while IFS=/ read -r _ _ pid _; do
    [ "$pid" = "$$" ] && continue
    IFS= read -r name < "/proc/$pid/comm" 2> /dev/null || name="?"
    echo "$pid:$name"
  done | sort -u
}

bus=$(smi --query-gpu=pci.bus_id --format=csv,noheader -i "$uuid" 2> /dev/null)
rc=$?
# nvidia-smi's exit code 15: "The GPU has fallen off the bus or has otherwise become inaccessible".
[ "$rc" -ne 15 ] || finish 14 "GPU $uuid has fallen off the bus (nvidia-smi exit 15): only a reboot brings it back"
[ "$rc" -eq 0 ] && [ -n "$bus" ] || finish 12 "GPU $uuid not found (nvidia-smi exit $rc)"
info=$(smi -q -i "$uuid") || finish 12 "nvidia-smi -q -i $uuid failed"
minor=$(field "Minor Number")
case "$minor" in ''|*[!0-9]*) finish 12 "no minor number for $uuid in nvidia-smi -q";; esac
cc=$(smi --query-gpu=compute_cap --format=csv,noheader -i "$uuid" 2> /dev/null) || cc="unknown"
major=${cc%%.*}
case "$major" in ''|*[!0-9]*) major=0;; esac
mig=$(smi --query-gpu=mig.mode.current --format=csv,noheader -i "$uuid" 2> /dev/null) || mig="[N/A]"
nvswitch=""
set +f
for f in "$dev"/nvidia-nvswitch[0-9]*; do
  if [ -e "$f" ]; then nvswitch="yes"; break; fi
done
set -f
# A GPU that registers with an NVLink fabric is on NVSwitches even where the switches have no device file here
# (HGX B200/B300: NVLink Subnet Manager manages them through the baseboard's management NIC).
case "$(field "Fabric/State")" in ""|N/A|*"Not Supported"*) ;; *) nvswitch="yes";; esac
step "GPU $uuid at $bus, $dev/nvidia$minor, compute capability $cc, MIG $mig, NVSwitch ${nvswitch:-no}"

if [ "$mig" = "Enabled" ]; then finish 11 "MIG is enabled on $uuid: its instances do not survive a reset; reboot instead"; fi
recovery=$(field "GPU Recovery Action")
case "$recovery" in *[Rr]eboot*) finish 14 "the driver asks for a reboot (GPU Recovery Action: $recovery)";; esac
if [ -n "$nvswitch" ]; then
  if [ "$major" -lt 8 ]; then
    finish 14 "NVSwitch system before Ampere (compute capability $cc): every GPU and NVSwitch must be reset together; reboot instead"
  elif [ "$major" -eq 8 ]; then
    running nv-fabricmanage || finish 14 "Ampere NVSwitch system and Fabric Manager is not running: a single GPU cannot be reset; reboot instead"
    step "Ampere NVSwitch system: Fabric Manager is running, the GPU can be reset alone"
  elif [ "$major" -ge 10 ]; then
    finish 14 "NVSwitch system of compute capability $cc: NVIDIA documents no single-GPU reset for it; reboot instead"
  fi
elif [ "$major" -lt 8 ]; then
  links=$(smi nvlink -s -i "$uuid" 2> /dev/null | grep -c 'Link [0-9]*: [0-9]')
  if [ "${links:-0}" -gt 0 ]; then
    finish 14 "GPU before Ampere with $links active NVLinks: its peers must be reset in the same command; reboot instead"
  fi
fi

# Our exporter holds NVML (collection and its Xid event thread): ask it to let go and wait for its answer.
if [ -d "$st" ]; then
  rm -f "$st/nvml-released"  # an acknowledgement left from an earlier reset is no answer to this one
  if : > "$st/release-nvml"; then released="yes"; else step "cannot ask the exporter to release NVML"; fi
  i=0
  while [ -n "$released" ] && [ ! -e "$st/nvml-released" ] && [ "$i" -lt "$release_wait" ]; do
    sleep 1; i=$((i + 1))
  done
  if [ -e "$st/nvml-released" ]; then
    step "exporter released NVML: $(tr '\n' ' ' < "$st/nvml-released")"
  else
    step "no exporter acknowledged the NVML release within ${release_wait}s"
  fi
fi

apps=$(smi --query-compute-apps=pid --format=csv,noheader -i "$uuid" 2> /dev/null | tr '\n' ' ')
case "$apps" in *[0-9]*) finish 10 "compute processes still run on $uuid: $apps";; esac
found=$(holders)
blocking=""
while IFS= read -r h; do
  [ -n "$h" ] || continue
  case "${h#*:}" in
    nvidia-persiste) ;;
    nv-fabricmanage) [ -n "$nvswitch" ] || blocking="$blocking $h" ;;
    *) blocking="$blocking $h" ;;
  esac
done << HOLDERS
$found
HOLDERS
found=$(printf '%s' "$found" | tr '\n' ' ')
if [ -n "$blocking" ]; then
  finish 10 "processes that nobody paused hold $dev/nvidia$minor (pid:name):$blocking; reboot instead"
fi
step "holders of $dev/nvidia$minor: ${found:-none}"

reset() {
  out=$(smi -r -i "$bus" 2>&1)
  rc=$?
  out=$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)
  return $rc
}
if ! reset; then
  pm=$(smi --query-gpu=persistence_mode --format=csv,noheader -i "$uuid" 2> /dev/null)
  [ "$pm" = "Enabled" ] || finish 13 "nvidia-smi -r -i $bus failed (exit $rc): $out"
  step "reset refused (exit $rc: $out); persistence mode is on: nvidia-smi -pm 0, then again"
  pm_off="yes"  # before the call: a -pm 0 that half-applied is put back too (-pm 1 when on is harmless)
  smi -pm 0 -i "$uuid" > /dev/null 2>&1 || finish 13 "nvidia-smi -pm 0 -i $uuid failed"
  reset || finish 13 "nvidia-smi -r -i $bus failed with persistence mode off (exit $rc): $out"
fi
step "reset $bus: $out"
if [ -n "$pm_off" ]; then
  pm_off=""
  smi -pm 1 -i "$uuid" > /dev/null 2>&1 || finish 15 "could not turn persistence mode back on for $uuid after the reset"
  step "persistence mode on again"
fi

back=$(smi --query-gpu=uuid --format=csv,noheader -i "$bus" 2> /dev/null) || finish 12 "no GPU answers at $bus after the reset"
[ "$back" = "$uuid" ] || finish 12 "after the reset $bus reports $back, not $uuid"
info=$(smi -q -i "$uuid") || finish 15 "nvidia-smi -q -i $uuid fails after the reset"
[ "$(field "Remapped Rows/Pending")" != "Yes" ] || finish 15 "a row remap is still pending after the reset"
[ "$(field "Remapped Rows/Remapping Failure Occurred")" != "Yes" ] || finish 15 "a row remapping failure is recorded: replace the GPU"
[ "$(field "Retired Pages/Pending Page Blacklist")" != "Yes" ] || finish 15 "pages wait for retirement, which only a reboot applies"
recovery=$(field "GPU Recovery Action")
case "$recovery" in ""|None|N/A|*deprecated*) ;; *) finish 15 "after the reset the driver asks for: $recovery";; esac
if [ -n "$nvswitch" ] && [ "$major" -ge 9 ]; then
  i=0
  while [ "$(field "Fabric/State")" != "Completed" ] && [ "$i" -lt "$fabric_wait" ]; do
    sleep 1; i=$((i + 1)); info=$(smi -q -i "$uuid") || info=""
  done
  state=$(field "Fabric/State"); status=$(field "Fabric/Status")
  [ "$state" = "Completed" ] && [ "$status" = "Success" ] || finish 15 "the GPU did not register with the NVLink fabric within ${fabric_wait}s (state ${state:-unknown}, status ${status:-unknown})"
  step "fabric registration completed"
fi
finish 0 "reset $uuid at $bus; same UUID back; no pending remap or retirement"
