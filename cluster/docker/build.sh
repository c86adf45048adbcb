#!/usr/bin/env bash
# Build the project image as uta-pipelines:<version in pyproject.toml> -- the one image name
# every manifest in cluster/ uses. With UTA_REGISTRY set (e.g. 123456789012.dkr.ecr.us-west-2.amazonaws.com)
# it also tags and pushes $UTA_REGISTRY/uta-pipelines:<version>.
#   cluster/docker/build.sh
#   UTA_REGISTRY=<registry> cluster/docker/build.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n 1)"
[ -n "$version" ] || { echo "build.sh: no 'version = \"...\"' line in pyproject.toml" >&2; exit 1; }
image="uta-pipelines:$version"

DOCKER_BUILDKIT=1 docker build -f "$root/cluster/docker/Dockerfile" -t "$image" "$root"
echo "built $image"
if [ -n "${UTA_REGISTRY:-}" ]; then
  docker tag "$image" "$UTA_REGISTRY/$image"
  docker push "$UTA_REGISTRY/$image"
  echo "pushed $UTA_REGISTRY/$image"
fi
