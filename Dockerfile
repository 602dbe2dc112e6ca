# Static (musl) baton binaries on minimal bases, for linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 --target operator -t baton-operator .
#   docker buildx build --platform linux/amd64,linux/arm64 --target agent -t baton-agent .
# Each platform builds natively (under emulation when it is not the host's), so no
# cross linker is needed; rust:alpine targets musl, which links statically.
FROM rust:1.95-alpine AS build
RUN apk add --no-cache build-base
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p operator -p agent \
 && mkdir /out && cp target/release/baton-operator target/release/baton-agent /out/

# The operator needs no host access: non-root, nothing but the binary.
FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build /out/baton-operator /baton-operator
USER 65532:65532
ENTRYPOINT ["/baton-operator"]

# The agent's privileges come from the DaemonSet (per backend), not from the image.
FROM gcr.io/distroless/static-debian12 AS agent
COPY --from=build /out/baton-agent /baton-agent
ENTRYPOINT ["/baton-agent"]
