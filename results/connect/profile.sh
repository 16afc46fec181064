#!/bin/bash
# One-off profile of the connect hook behind results/connect/profile.md. Run as root from the
# repository root after `cargo build --bins`; needs perf, bpftool and python3. Makes the netns
# and cgroup "plf" and the pin path /sys/fs/bpf/plf (mounting bpffs if needed), and removes
# them on exit.
# Usage: bash results/connect/profile.sh service|pass   (a connect to a Service, or to the pod)
set -u
MODE=${1:-service}
HERE=results/connect
DIR=$(mktemp -d)
mkdir -p "$DIR/m"
cp $HERE/profile-svc.yaml "$DIR/m/svc.yaml"
SRV= AG=
# The agent mounts bpffs if the machine has none; then it is unmounted again at the end.
BPFFS_BEFORE=$(mount | grep -c " /sys/fs/bpf ")
cleanup() {
  [ -n "$SRV" ] && kill "$SRV" 2>/dev/null
  [ -n "$AG" ] && kill "$AG" 2>/dev/null
  sleep 0.3
  target/debug/socklb-agent cleanup --pin-path /sys/fs/bpf/plf >/dev/null 2>&1
  rmdir /sys/fs/cgroup/unified/plf 2>/dev/null
  ip netns del plf 2>/dev/null
  sysctl -qw kernel.bpf_stats_enabled=0
  [ "$BPFFS_BEFORE" = 0 ] && umount /sys/fs/bpf 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT
ip netns add plf
nsenter --net=/run/netns/plf ip link set lo up
nsenter --net=/run/netns/plf ip addr add 10.244.77.1/32 dev lo
mkdir -p /sys/fs/cgroup/unified/plf
nsenter --net=/run/netns/plf python3 $HERE/profile-server.py & SRV=$!
target/debug/socklb-agent --manifests "$DIR/m" --cgroup /sys/fs/cgroup/unified/plf \
  --pin-path /sys/fs/bpf/plf --status-address off > "$DIR/agent.log" 2>&1 & AG=$!
sleep 2
if [ "$MODE" = service ]; then T="10.96.77.10 80"; else T="10.244.77.1 8080"; fi
client() {
  bash -c "echo \$\$ > /sys/fs/cgroup/unified/plf/cgroup.procs; exec nsenter --net=/run/netns/plf python3 $HERE/profile-client.py $T $1"
}
client 2000 > /dev/null # warm up
perf record -q -a -g -F 25000 -o "$DIR/perf.data" -- bash -c "$(declare -f client); T='$T'; HERE=$HERE; client 20000"
# The leaf function of every sample taken under connect4, as a share of them.
perf script -i "$DIR/perf.data" -F comm,ip,sym 2>/dev/null | awk '
  NF == 0 { if (stack ~ /_connect4/) { n[leaf]++; total++ } stack = ""; leaf = ""; next }
  /^[^ \t]/ { stack = ""; leaf = ""; next }
  { if (leaf == "") leaf = $2; stack = stack " " $2 }
  END { for (k in n) printf "%6d %5.1f%% %s\n", n[k], 100 * n[k] / total, k; print total, "samples under connect4" }' \
  | sort -rn | head -25
