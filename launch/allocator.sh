# Sourced by launch/demo.sh: `with_allocator CMD...` runs CMD with jemalloc preloaded, told to keep the pages it
# frees (retain:true, no dirty/muzzy decay), when the library is installed (Debian/Ubuntu: apt-get install
# libjemalloc2; another path: MMRS_JEMALLOC=/path/libjemalloc.so.2). MMRS_ALLOCATOR=system runs CMD unchanged.
#
# Why (benchmarks/RESULTS.md, "allocator"): XLA:CPU gets the step's temporary buffers from malloc on every step, and
# glibc hands large blocks back to the kernel on free, so each MixMAE ViT-S step touched ~387k fresh pages (page
# faults and zeroing: ~0.8 s of a ~4 s step). With retained pages the same step takes 8-36 faults and runs 1.24x faster.
# The training process's grain workers inherit the preload. An MALLOC_CONF already set is kept.
with_allocator() {
  local lib=${MMRS_JEMALLOC:-/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so.2}
  case ${MMRS_ALLOCATOR:-jemalloc} in
    system) "$@" ;;
    jemalloc)
      if [[ -f $lib ]]; then
        LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" \
          MALLOC_CONF="${MALLOC_CONF:-retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1}" "$@"
      else
        echo "note: $lib not found, running with the system allocator (apt-get install libjemalloc2 for faster CPU steps; MMRS_ALLOCATOR=system silences this)" >&2
        "$@"
      fi ;;
    *) echo "MMRS_ALLOCATOR=${MMRS_ALLOCATOR}: use jemalloc (default) or system" >&2; return 2 ;;
  esac
}
