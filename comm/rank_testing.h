#pragma once
// Test helpers for multi-rank code with real processes (testonly, //comm:rank_testing): ranks are
// forked children of the test, meeting through a file store in a fresh directory.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace tessera::comm::testing {

// A fresh, empty directory under TEST_TMPDIR (or /tmp) named after `name` and this process; empty
// on failure (the caller's rendezvous then fails with a message naming it).
inline std::string TmpDir(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(dir != nullptr ? dir : "/tmp") + "/" + name + "_" + std::to_string(getpid());
  return system(("rm -rf '" + path + "' && mkdir -p '" + path + "'").c_str()) == 0 ? path : std::string();
}

// Runs body(rank) in `n` child processes and returns their exit codes, by rank: body's result (the
// convention: the number of failed checks, 0 when all passed), 200 for a child killed by a signal.
inline std::vector<int> RunRanks(int n, const std::function<int(int)>& body) {
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    const pid_t pid = fork();
    if (pid == 0) _exit(body(r));
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (pid_t pid : pids) {
    int status = 0;
    codes.push_back(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) ? WEXITSTATUS(status) : 200);
  }
  return codes;
}

}  // namespace tessera::comm::testing
