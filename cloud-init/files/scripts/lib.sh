# Shared by the provisioning scripts (sourced, not run): a bounded wait on real state.
#
#   wait_for WHAT UNIT SECONDS COMMAND...
# runs COMMAND every second until it succeeds; after SECONDS tries it prints the unit's journal and fails.
wait_for() {
    what=$1 unit=$2 limit=$3
    shift 3
    i=0
    until "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge "$limit" ]; then
            echo "infra-lab: $what did not answer within $limit s" >&2
            journalctl -u "$unit" --no-pager -n 40 >&2 || true
            return 1
        fi
        sleep 1
    done
}
