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

#   pin_key KEYFILE FINGERPRINT KEYRING
# writes KEYRING (binary, for apt's signed-by) only when KEYFILE holds exactly one primary key, FINGERPRINT:
# a file with any other key beside it (in the same armored block or another) is refused, since apt would
# trust every key in the keyring. The keyring is written by gpg itself (import-export: parsed and cleaned,
# no keyring or agent involved) and checked again before it replaces the old one. gpg runs with a throwaway
# GNUPGHOME, never ~/.gnupg.
pin_key() {
    keyfile=$1 want=$2 keyring=$3
    home=$(mktemp -d) || return 1
    found=$(GNUPGHOME=$home gpg --batch --show-keys --with-colons "$keyfile" 2>/dev/null | primary_fingerprints)
    if [ "$found" != "$want" ]; then
        echo "infra-lab: $keyfile holds key(s) [$(printf "%s" "$found" | tr "\n" " ")], expected exactly [$want]; refusing it" >&2
    elif GNUPGHOME=$home gpg --batch --quiet --import-options import-export --import "$keyfile" >"$keyring.tmp" 2>/dev/null; then
        found=$(GNUPGHOME=$home gpg --batch --show-keys --with-colons "$keyring.tmp" 2>/dev/null | primary_fingerprints)
        if [ "$found" != "$want" ]; then
            echo "infra-lab: the written keyring holds [$(printf "%s" "$found" | tr "\n" " ")], expected exactly [$want]; refusing it" >&2
        fi
    else
        found=""
        echo "infra-lab: gpg could not convert $keyfile into a keyring; refusing it" >&2
    fi
    rm -rf "$home"
    if [ "$found" != "$want" ] || [ ! -s "$keyring.tmp" ]; then
        rm -f "$keyring.tmp"
        return 1
    fi
    mv "$keyring.tmp" "$keyring"
}

# gpg --with-colons on stdin -> the fingerprint of each primary key (pub/sec), one per line
primary_fingerprints() {
    awk -F: '$1 == "pub" || $1 == "sec" { primary = 1; next }
             $1 == "fpr" && primary { print $10 }
             { primary = 0 }'
}
