#include "core/openmp_waits.h"

#include <unistd.h>

#include <cstdlib>

namespace attnserve {

void PreferSleepingOpenMpWaits(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) {
    return;
  }
  if (setenv("OMP_WAIT_POLICY", "passive", /*overwrite=*/1) != 0) return;
  execv("/proc/self/exe", argv);
  // Still here: exec failed. Keep the environment as the caller gave it.
  unsetenv("OMP_WAIT_POLICY");
}

}  // namespace attnserve
