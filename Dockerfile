# Static (musl) baton binaries on minimal bases, for linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 --target operator -t baton-operator .
#   docker buildx build --platform linux/amd64,linux/arm64 --target agent -t baton-agent .
# The build stage runs on the build machine's own platform and cross-compiles with clang
# and rust-lld through .ci/static, the script CI runs to prove the binaries link
# statically for both architectures; no emulation is needed.
FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
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

# The operator needs no host access: non-root, nothing but the binary.
FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build /out/baton-operator /baton-operator
USER 65532:65532
ENTRYPOINT ["/baton-operator"]

# The agent's privileges come from the DaemonSet (per backend), not from the image.
FROM gcr.io/distroless/static-debian12 AS agent
COPY --from=build /out/baton-agent /baton-agent
ENTRYPOINT ["/baton-agent"]
