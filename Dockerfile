# legate: multi-stage build, small runtime image, non-root, `legate` as the entrypoint.
#   docker build -t legate .
#   docker run --rm legate --help

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not refetch and rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin legate
COPY --from=build /src/target/release/legate /usr/local/bin/legate
# glibc's memcpy takes its vector loop up to 2 MiB: on AMD EPYC its default (rep movsb above
# 4 KiB) runs at 1-3 GB/s for the buffer offsets TLS records hit; one stream carried 12% more
# with it (docs/performance.md, "The copy that ran at 2 GB/s"). Override with -e to change.
ENV GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=2097152
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["/usr/local/bin/legate"]
CMD ["--help"]
