# legate: multi-stage build, small runtime image, non-root, `legate` as the entrypoint.
#   docker build -t legate .
#   docker run --rm legate --help

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not refetch and rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin legate
COPY --from=build /src/target/release/legate /usr/local/bin/legate
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["/usr/local/bin/legate"]
CMD ["--help"]
