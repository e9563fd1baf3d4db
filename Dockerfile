# syntax=docker/dockerfile:1
# attnserve container image, CPU backends (own kernels and oneDNN).
#
#   docker build -t attnserve:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9464:9464 attnserve:0.1.0 --threads=4
#
# Two stages: `build` installs the toolchain and -dev packages through
# scripts/install-deps (the same script CI runs) and builds the Release binaries;
# the runtime stage holds only the shared libraries they load, named below, and
# runs as an unprivileged user. The GPU image is Dockerfile.cuda.

ARG DEBIAN_IMAGE=debian:bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS build
# Dependencies first: this layer is rebuilt only when the package list changes.
COPY scripts/install-deps /src/scripts/install-deps
RUN /src/scripts/install-deps --build-only && rm -rf /var/lib/apt/lists/*
COPY CMakeLists.txt /src/CMakeLists.txt
COPY proto /src/proto
COPY src /src/src
COPY wire /src/wire
COPY server /src/server
COPY client /src/client
COPY bench /src/bench
RUN --mount=type=cache,target=/root/.cache/ccache \
    cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DATTNSERVE_BUILD_TESTS=OFF -DATTNSERVE_CUDA=OFF \
 && cmake --build /build --target attnserve attnctl \
 && install -D -s -m 0755 /build/server/attnserve /out/usr/local/bin/attnserve \
 && install -D -s -m 0755 /build/client/attnctl /out/usr/local/bin/attnctl

FROM ${RUNTIME_IMAGE} AS runtime
# The Debian bookworm runtime libraries of gRPC 1.51, Protobuf 3.21, Abseil
# 20220623, oneDNN 2.6 (with the OpenCL loader its library links), prometheus-cpp
# 1.0 (core and pull, which embeds civetweb), cairo and a font (attnctl's
# heatmaps) and what those link. tests/deploy
# checks that this list covers every library the binaries load.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libre2-9 libc-ares2 libssl3 \
      libdnnl2 ocl-icd-libopencl1 libgomp1 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 libcivetweb1 \
      libcairo2 libpixman-1-0 libfontconfig1 libfreetype6 libpng16-16 libexpat1 libbrotli1 \
      libx11-6 libxext6 libxrender1 libxcb1 libxcb-render0 libxcb-shm0 libxau6 libxdmcp6 \
      libbsd0 libmd0 fonts-dejavu-core \
      libstdc++6 zlib1g ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
# Fail the image build, not the first start, if a library is missing.
RUN ! ldd /usr/local/bin/attnserve /usr/local/bin/attnctl | grep 'not found'
RUN groupadd --system --gid 10001 attnserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin attnserve
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# gRPC API, Prometheus metrics (GET /metrics).
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["/usr/local/bin/attnctl", "--target=127.0.0.1:50051", "health"]
ENTRYPOINT ["/usr/local/bin/attnserve"]
CMD ["--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9464"]
