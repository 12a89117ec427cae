#!/bin/sh
# Install the pinned Nomad from HashiCorp's apt repository. Idempotent.
# /etc/infra-lab/provision.env (written by cloud-init) sets NOMAD_VERSION, HASHICORP_KEY_FPR and, when the
# seed embeds the key, the key itself is at /etc/infra-lab/hashicorp.asc. Without it the key is fetched;
# either way it must hold exactly one key, with fingerprint HASHICORP_KEY_FPR (lib.sh pin_key), or nothing is
# installed; only that key goes into apt's signed-by keyring.
set -eu
. /etc/infra-lab/provision.env
. /usr/local/lib/infra-lab/lib.sh
keyring=/usr/share/keyrings/hashicorp-archive-keyring.gpg
if [ "$(dpkg-query -W -f '${Version}' nomad 2>/dev/null || true)" = "${NOMAD_VERSION}-1" ]; then
    echo "infra-lab: nomad ${NOMAD_VERSION} already installed"
    exit 0
fi
key=/etc/infra-lab/hashicorp.asc
if [ ! -s "$key" ]; then
    echo "infra-lab: no embedded HashiCorp key; fetching ${HASHICORP_KEY_URL}"
    curl -fsSL --retry 5 --retry-connrefused -o /run/hashicorp.asc "$HASHICORP_KEY_URL"
    key=/run/hashicorp.asc
fi
if ! pin_key "$key" "$HASHICORP_KEY_FPR" "$keyring"; then
    echo "infra-lab: HashiCorp's key is not exactly the pinned $HASHICORP_KEY_FPR; refusing to install" >&2
    exit 1
fi
. /etc/os-release
echo "deb [signed-by=$keyring] https://apt.releases.hashicorp.com ${VERSION_CODENAME} main" \
    > /etc/apt/sources.list.d/hashicorp.list
apt-get update -o Dir::Etc::sourcelist=sources.list.d/hashicorp.list -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0
# A pin the repository does not carry (withdrawn, a typo, not yet published for this release) would only
# say "Version '...' for 'nomad' was not found": name the versions it has instead.
available=$(apt-cache madison nomad | awk '{print $3}')
if ! printf '%s\n' "$available" | grep -qxF "${NOMAD_VERSION}-1"; then
    echo "infra-lab: nomad=${NOMAD_VERSION}-1 is not in HashiCorp's repository for ${VERSION_CODENAME}; it has:" \
        "$(printf '%s\n' "$available" | sed 's/-1$//' | head -n 12 | tr '\n' ' ')" >&2
    echo "infra-lab: set provision.nomad_version to one of them" >&2
    exit 1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "nomad=${NOMAD_VERSION}-1"
apt-mark hold nomad
echo "infra-lab: installed $(nomad version | head -n 1)"
