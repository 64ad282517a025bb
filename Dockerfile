# Build stage: a release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY config ./config
RUN cargo build --profile dist --locked --bin pgwarden

# Runtime stage: the binary and CA certificates, running as an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --shell /usr/sbin/nologin pgwarden
COPY --from=build /src/target/dist/pgwarden /usr/local/bin/pgwarden
COPY config/pgwarden.example.toml /etc/pgwarden/pgwarden.example.toml
USER pgwarden
EXPOSE 6432 9930
ENTRYPOINT ["/usr/local/bin/pgwarden"]
CMD ["serve", "--config", "/etc/pgwarden/pgwarden.toml"]
