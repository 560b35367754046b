#!/usr/bin/env bash
# two_hosts_test.sh BUILD_DIR — a run across two hosts, on one machine: two network namespaces
# ("host A" 10.213.0.1, "host B" 10.213.0.2) joined by a veth pair, so that each host has its
# own interface and 127.0.0.1 is its own. pretrain_gpt runs tp 2 inside a host and dp 2
# across (rank = tp_rank + 2·dp_rank: ranks 0,1 on A, 2,3 on B), started directly, four ways:
#   (a) torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=10.213.0.1, MASTER_PORT):
#       each rank's Gloo device must bind to its own host's address;
#   (b) the same with GLOO_SOCKET_IFNAME naming each host's interface;
#   (c) Slurm's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST) and
#       no MASTER_ADDR/MASTER_PORT: the master is the node list's first host (resolved through
#       /etc/netns/<ns>/hosts, which `ip netns exec` mounts over /etc/hosts), port 29500;
#   (d) the reference: the same layout with all 4 ranks on host A, at 127.0.0.1.
# Every logged loss of (a)-(c) must equal (d)'s as a hex float ("loss_hex" in --metrics-file).
# Needs root (CAP_NET_ADMIN) and iproute2; without them it says why and exits 77, which CTest
# reports as skipped. Writes only into its own mktemp folder and /etc/netns/<its namespaces>.
set -u

build=$(cd "${1:?usage: two_hosts_test.sh BUILD_DIR}" && pwd)
bin=$build/examples/pretrain_gpt
[[ -x $bin ]] || { echo "two_hosts_test.sh: $bin is not built"; exit 2; }

# The ranks' launcher variables are the ones this script sets, nothing inherited (a CI job
# running under Slurm or mpirun must not leak its own).
for v in $(compgen -e); do
  case $v in
    OMPI_* | PMI_* | PMIX_* | MPI_LOCALRANKID | SLURM_* | RANK | WORLD_SIZE | LOCAL_RANK | MASTER_ADDR | MASTER_PORT | \
      TORCHELASTIC_* | GLOO_SOCKET_IFNAME) unset "$v" ;;
  esac
done

skip() {
  echo "two_hosts_test.sh: SKIPPED: $*"
  exit 77
}
command -v ip >/dev/null || skip "no 'ip' command (iproute2) to create network namespaces"
((EUID == 0)) || skip "creating network namespaces needs root (CAP_NET_ADMIN); run it as root"

id=lt2h$$  # namespaces, interfaces and host names unique to this run (interface names <= 15 chars)
ns_a=${id}a ns_b=${id}b
if_a=${id}va if_b=${id}vb
host_a=${id}n1 host_b=${id}n2
addr_a=10.213.0.1 addr_b=10.213.0.2  # exist only inside the two namespaces
port=29910                           # inside the namespaces: no other test can see it
work=$(mktemp -d /tmp/lightron_two_hosts.XXXXXX)
launched=()  # pids of the ranks (timeout processes) this script started
made_etc_netns=0
[[ -d /etc/netns ]] || made_etc_netns=1

cleanup() {
  local p
  for p in "${launched[@]}"; do kill -TERM "$p" 2>/dev/null; done  # timeout passes it on to the rank
  ip netns del "$ns_a" 2>/dev/null
  ip netns del "$ns_b" 2>/dev/null  # deleting a namespace deletes its end of the veth pair, and so the pair
  rm -rf "/etc/netns/$ns_a" "/etc/netns/$ns_b" "$work"
  ((made_etc_netns)) && rmdir /etc/netns 2>/dev/null  # unless someone has put files there since
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# setup COMMAND...: a step of building the two hosts; its failure means this machine cannot.
setup() { "$@" 2>"$work/setup.err" || skip "'$*' failed: $(head -n 1 "$work/setup.err")"; }
setup ip netns add "$ns_a"
setup ip netns add "$ns_b"
setup ip link add "$if_a" type veth peer name "$if_b"
setup ip link set "$if_a" netns "$ns_a"
setup ip link set "$if_b" netns "$ns_b"
setup ip -n "$ns_a" addr add "$addr_a/24" dev "$if_a"
setup ip -n "$ns_b" addr add "$addr_b/24" dev "$if_b"
for ns in "$ns_a" "$ns_b"; do
  setup ip -n "$ns" link set lo up
  mkdir -p "/etc/netns/$ns"
  printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$addr_a" "$host_a" "$addr_b" "$host_b" >"/etc/netns/$ns/hosts"
done
setup ip -n "$ns_a" link set "$if_a" up
setup ip -n "$ns_b" link set "$if_b" up

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

# tp 2 x dp 2; a model that trains 10 steps in a few seconds.
flags=(--mock-data --vocab-size 64 --num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16
  --micro-batch-size 1 --global-batch-size 8 --train-iters 10 --lr 3e-3 --min-lr 3e-4 --log-interval 1
  --num-threads 1 --tensor-model-parallel-size 2 --distributed-timeout-seconds 60)

# run NAME HOSTS: starts ranks 0-3, rank r on host ${HOSTS:r:1} (AABB: two per host; AAAA: all
# on A), each with the variables that the function NAME_vars prints for it; waits for all;
# checks exit codes. Rank r's output is in $work/NAME/out.r.
run() {
  local name=$1 hosts=$2 dir=$work/$1 r ns pids=() rc ok=1
  mkdir -p "$dir"
  for r in 0 1 2 3; do
    ns=$ns_a
    [[ ${hosts:r:1} == B ]] && ns=$ns_b
    # shellcheck disable=SC2046  # the variables are words of VAR=VALUE
    timeout -k 5 180 ip netns exec "$ns" env $("${name}_vars" "$r") OMP_NUM_THREADS=1 "$bin" "${flags[@]}" \
      --metrics-file "$dir/metrics.jsonl" >"$dir/out.$r" 2>&1 &
    pids+=($!)
    launched+=($!)
  done
  for r in 0 1 2 3; do
    wait "${pids[$r]}"
    rc=$?
    if ((rc != 0)); then
      fail "$name: rank $r exited $rc"
      sed 's/^/    | /' "$dir/out.$r" | grep -v "^    |  iteration" | tail -n 5
      ok=0
    fi
  done
  launched=()
  ((ok)) && echo "   $name: 4 ranks finished, $(grep -c loss_hex "$dir/metrics.jsonl") steps logged"
  return $((1 - ok))
}
# "iteration loss_hex" per logged step.
losses() { sed -n 's/.*"iteration": \([0-9]*\),.*"loss_hex": "\([^"]*\)".*/\1 \2/p' "$1"; }

torchrun_vars() { echo "RANK=$1 WORLD_SIZE=4 LOCAL_RANK=$(($1 % 2)) MASTER_ADDR=$addr_a MASTER_PORT=$port"; }
ifname_vars() {
  local ifname=$if_a
  (($1 >= 2)) && ifname=$if_b
  echo "$(torchrun_vars "$1") GLOO_SOCKET_IFNAME=$ifname"
}
slurm_vars() { echo "SLURM_PROCID=$1 SLURM_NTASKS=4 SLURM_LOCALID=$(($1 % 2)) SLURM_JOB_NODELIST=${id}n[1-2]"; }
one_host_vars() { echo "RANK=$1 WORLD_SIZE=4 LOCAL_RANK=$1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port"; }

echo "== two hosts: namespaces $ns_a ($addr_a, $host_a) and $ns_b ($addr_b, $host_b), tp 2 x dp 2"
run one_host AAAA || fail "the one-host reference run failed"
reference=$(losses "$work/one_host/metrics.jsonl")
(($(wc -l <<<"$reference") == 10)) || fail "the one-host run logged $(wc -l <<<"$reference") losses, not 10"

for name in torchrun ifname slurm; do
  run "$name" AABB || continue
  if [[ $(losses "$work/$name/metrics.jsonl") == "$reference" ]]; then
    echo "   $name: all 10 losses equal the one-host run's, bit for bit"
  else
    fail "$name: losses differ from the one-host run"
    diff <(echo "$reference") <(losses "$work/$name/metrics.jsonl") | sed 's/^/    | /'
  fi
done

if ((failures > 0)); then
  echo "two_hosts_test.sh: $failures expectation(s) failed"
  exit 1
fi
echo "two_hosts_test.sh: torchrun, GLOO_SOCKET_IFNAME and Slurm launches across two hosts gave the one-host losses"
