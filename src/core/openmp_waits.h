// OpenMP's idle threads, made to sleep instead of spin. oneDNN runs its
// primitives (the --model projections, the onednn backend) on OpenMP
// threads, which by default spin for milliseconds after each parallel region
// and so take the cores from the cpu backend's own thread pool that runs the
// attention next (measured on a decode step: attention 4.6 ms with sleeping
// waits, 8.6 ms with spinning ones; see bench/README.md). OpenMP reads
// OMP_WAIT_POLICY once, when the process starts, so the policy can only be
// set from outside or by starting afresh.
#ifndef ATTNSERVE_CORE_OPENMP_WAITS_H_
#define ATTNSERVE_CORE_OPENMP_WAITS_H_

namespace attnserve {

// Unless the environment already chooses (OMP_WAIT_POLICY or GOMP_SPINCOUNT
// set), re-executes this program (/proc/self/exe, same argv, same pid) with
// OMP_WAIT_POLICY=passive. Call first thing in main, before any thread
// starts. Returns when no re-execution happened: already chosen, or exec
// failed (the process then runs on with spinning waits).
void PreferSleepingOpenMpWaits(char** argv);

}  // namespace attnserve

#endif  // ATTNSERVE_CORE_OPENMP_WAITS_H_
