# Build stage: the profile-guided release binary (scripts/build-dist.sh). Its training runs
# pgwarden against a throwaway PostgreSQL under pgbench; the script installs the llvm-profdata
# of rustc's LLVM major itself (Debian's llvm-22 for rustc 1.95). For a plain build, without
# those packages' weight in the build stage: --build-arg PGWARDEN_PGO=0.
FROM rust:1.95-bookworm AS build
ARG PGWARDEN_PGO=1
RUN if [ "$PGWARDEN_PGO" != 0 ]; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           postgresql postgresql-contrib \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY config ./config
COPY scripts ./scripts
RUN PGWARDEN_PGO=$PGWARDEN_PGO scripts/build-dist.sh --locked

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
