# Static (musl) baton binaries on minimal bases, for linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 --target operator -t baton-operator .
#   docker buildx build --platform linux/amd64,linux/arm64 --target agent -t baton-agent .
# The build stage runs on the build machine's own platform and cross-compiles with clang
# and rust-lld through .ci/static, the script CI runs to prove the binaries link
# statically for both architectures; no emulation is needed.
#
# Base images are pinned by digest (the tag says what it is, the digest which one);
# updating a base is a reviewed change of this file. The digests were taken from public
# builds that pin the same tags; no registry is reachable from baton's CI to re-check
# them, so a build that cannot pull one fails rather than take another image.
ARG BUILD_IMAGE=rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot@sha256:d093aa3e30dbadd3efe1310db061a14da60299baff8450a17fe0ccc514a16639
# The OCI labels (.ci/image sets the same; .ci/image-check compares the two paths):
#   --build-arg VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
#   --build-arg REVISION=$(git rev-parse HEAD)
ARG VERSION=dev
ARG REVISION=unknown

FROM --platform=$BUILDPLATFORM ${BUILD_IMAGE} AS build
ARG TARGETARCH
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang llvm binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN case "$TARGETARCH" in \
      amd64) arch=x86_64 ;; \
      arm64) arch=aarch64 ;; \
      *) echo "unsupported architecture $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && .ci/static "$arch" /out

# What both images share: the OCI labels and the non-root user (65532).
FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION
ARG REVISION
LABEL org.opencontainers.image.source="https://github.com/baton-dev/baton" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532

# The operator needs no host access: non-root, nothing but the binary.
FROM runtime AS operator
LABEL org.opencontainers.image.title="baton-operator"
COPY --from=build /out/baton-operator /baton-operator
ENTRYPOINT ["/baton-operator"]

# The agent's privileges come from the DaemonSet (per backend), not from the image: by
# default it is the non-root user baton-agent (65532), which the host's polkit rule
# and D-Bus policy name; the chart runs it as root only where a reboot method needs it.
FROM runtime AS agent
LABEL org.opencontainers.image.title="baton-agent"
COPY --from=build /out/baton-agent /baton-agent
ENTRYPOINT ["/baton-agent"]
