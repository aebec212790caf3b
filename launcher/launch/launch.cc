// launch: starts N local ranks of any program, like torchrun's --standalone mode.
//
//   bazel run //launcher/launch -- --nproc=4 -- /path/to/program --its --flags
//
// Each rank gets RANK (node_rank * nproc + local rank), WORLD_SIZE (nnodes * nproc), LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in its environment, and its output lines come out
// prefixed with "[rank R] " (stdout to stdout, stderr to stderr). When a rank fails (a non-zero exit
// or a signal), the others get SIGTERM, then SIGKILL after --grace_s; launch exits with the first
// failure's code (128 + signal for a signal), or 0 when every rank succeeded. SIGINT, SIGTERM and
// SIGHUP (and SIGUSR1) sent to launch stop the ranks the same way. --log_dir keeps each rank's output in a file of
// its own too; --console_ranks limits the console to some ranks.
//
// --max_restarts=K (torchrun's --max-restarts): after a rank fails, the node's ranks are stopped
// and all started again, up to K times, after --restart_delay_s; each attempt's ranks get
// TESSERA_RESTART_COUNT (0, 1, ...), under which they rendezvous apart from the attempts before
// (comm::CommConfigFromEnv), and a training run given --resume=auto goes on from its latest
// checkpoint. No restart follows a signal to launch, or a rank that stopped on a signal of its own
// (exit code 128 + SIGTERM, SIGINT or SIGUSR1). Meant for one node: on several, each node's launch
// counts its own attempts, and the other nodes' ranks fail only when their collectives time out,
// so the nodes meet again only if the first node's rendezvous (the communicator's timeout) outlasts
// that; for multi-node jobs prefer the scheduler's requeue with --resume=auto.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <gflags/gflags.h>

DEFINE_string(nproc, "1", "Ranks to start on this node: a number, or 'gpu' for one per GPU of this node (those "
              "CUDA_VISIBLE_DEVICES lists when it is set, else the driver's).");
DEFINE_int32(nnodes, 1, "Nodes in the job (the others run their own launch).");
DEFINE_int32(node_rank, 0, "This node's index in [0, nnodes).");
DEFINE_string(master_addr, "127.0.0.1", "Rank 0's host, for the rendezvous (MASTER_ADDR).");
DEFINE_int32(master_port, 29500, "Rank 0's rendezvous port (MASTER_PORT).");
DEFINE_double(grace_s, 5, "Seconds between SIGTERM and SIGKILL when stopping the ranks.");
DEFINE_int32(max_restarts, 0,
             "Times to start all ranks again after one fails (TESSERA_RESTART_COUNT tells them which attempt; "
             "with train's --resume=auto they go on from the latest checkpoint).");
DEFINE_double(restart_delay_s, 3, "Seconds to wait between stopping the ranks and restarting them.");
DEFINE_string(log_dir, "",
              "Also write each rank's output (stdout and stderr, unprefixed) to DIR/rank-R.log (a restart's "
              "attempt K: rank-R.attempt-K.log); created if missing.");
DEFINE_string(console_ranks, "all",
              "Ranks whose output lines reach this console, comma-separated (e.g. 0), or 'all' (torchrun's "
              "--local-ranks-filter); with --log_dir every rank's still goes to its file.");

namespace {

int g_nproc = 1;  // --nproc, resolved

// --nproc=gpu: the GPUs of this node -- the entries of CUDA_VISIBLE_DEVICES when it is set (as the
// ranks will see them), else the NVIDIA driver's devices; 0 when there are none.
int CountGpus() {
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES"); visible != nullptr) {
    const std::string v = visible;
    if (v.empty() || v == "-1" || v == "NoDevFiles") return 0;
    return static_cast<int>(std::count(v.begin(), v.end(), ',')) + 1;
  }
  std::error_code ec;
  int n = 0;
  for (std::filesystem::directory_iterator it("/proc/driver/nvidia/gpus", ec), end; !ec && it != end; it.increment(ec)) ++n;
  return n;
}

volatile sig_atomic_t g_signal = 0;
void OnSignal(int sig) { g_signal = sig; }

struct Rank {
  pid_t pid = -1;
  int out = -1, err = -1;  // read ends of its stdout / stderr pipes
  std::string out_buf, err_buf;  // partial lines
  bool running = false;  // started and not yet reaped
  bool console = true;   // its lines reach the console (--console_ranks)
  FILE* log = nullptr;   // --log_dir: its file
};

// Writes complete lines from `buf` -- with the prefix to `to` (null: not to the console), as they
// are to `log` (null: none); keeps the partial tail (all of it at `flush`).
void Emit(std::string& buf, const std::string& prefix, FILE* to, FILE* log, bool flush) {
  auto line = [&](const char* p, int n) {
    if (to != nullptr) fprintf(to, "%s%.*s\n", prefix.c_str(), n, p);
    if (log != nullptr) fprintf(log, "%.*s\n", n, p);
  };
  size_t start = 0;
  for (size_t nl; (nl = buf.find('\n', start)) != std::string::npos; start = nl + 1) {
    line(buf.data() + start, static_cast<int>(nl - start));
  }
  buf.erase(0, start);
  if (flush && !buf.empty()) {
    line(buf.data(), static_cast<int>(buf.size()));
    buf.clear();
  }
  if (to != nullptr) fflush(to);
  if (log != nullptr) fflush(log);
}

// A non-negative number written in 1 to 9 digits (no sign, no spaces); false otherwise.
bool ParseDigits(const std::string& s, int* out) {
  if (s.empty() || s.size() > 9 || s.find_first_not_of("0123456789") != std::string::npos) return false;
  *out = static_cast<int>(std::strtol(s.c_str(), nullptr, 10));
  return true;
}

// --console_ranks: the ranks listed (all of them for "all"); false on a malformed list.
bool ParseConsoleRanks(const std::string& spec, std::vector<int>* ranks, bool* all) {
  *all = spec == "all";
  if (*all) return true;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = std::min(spec.find(',', start), spec.size());
    int r = 0;
    if (!ParseDigits(spec.substr(start, comma - start), &r)) return false;
    ranks->push_back(r);
    start = comma + 1;
  }
  return !ranks->empty();
}
bool g_console_all = true;
std::vector<int> g_console_ranks;

void StopAll(std::vector<Rank>& ranks, double grace_s) {
  for (Rank& r : ranks) {
    if (r.running) kill(r.pid, SIGTERM);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
  for (Rank& r : ranks) {
    while (r.running && std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (waitpid(r.pid, &status, WNOHANG) == r.pid) {
        r.running = false;
      } else {
        usleep(20000);
      }
    }
  }
  for (Rank& r : ranks) {
    if (r.running) {
      kill(r.pid, SIGKILL);
      waitpid(r.pid, nullptr, 0);
      r.running = false;
    }
  }
}

// Stops the ranks started so far and closes their pipes (a failure to start the others).
int AbortStart(std::vector<Rank>& ranks, const char* what) {
  fprintf(stderr, "%s: %s\n", what, strerror(errno));  // (before the closes below touch errno)
  StopAll(ranks, FLAGS_grace_s);
  for (Rank& r : ranks) {
    if (r.out >= 0) close(r.out);
    if (r.err >= 0) close(r.err);
    r.out = r.err = -1;
    if (r.log != nullptr) fclose(r.log);
    r.log = nullptr;
  }
  return 1;
}

// One attempt: starts the node's ranks and waits for them (stopping all once one fails). Returns the
// first failure's code (0: all succeeded); *signalled: launch itself got a signal; *stopped: the
// first failure was a rank that stopped on a signal of its own (it exited with 128 + SIGTERM,
// SIGINT or SIGUSR1, as train --stop_on_signal does once it has saved): a stop, not a crash.
int RunAttempt(char** argv, int attempt, bool* signalled, bool* stopped) {
  const int world = FLAGS_nnodes * g_nproc;
  std::vector<Rank> ranks(g_nproc);
  for (int local = 0; local < g_nproc; ++local) {
    int out[2], err[2];
    // (Close-on-exec: the ranks started later must not inherit these, nor the logs.)
    if (pipe2(out, O_CLOEXEC) != 0) return AbortStart(ranks, "launch: pipe");
    if (pipe2(err, O_CLOEXEC) != 0) {
      close(out[0]), close(out[1]);
      return AbortStart(ranks, "launch: pipe");
    }
    const int rank = FLAGS_node_rank * g_nproc + local;
    FILE* log = nullptr;
    if (!FLAGS_log_dir.empty()) {
      const std::string path = FLAGS_log_dir + "/rank-" + std::to_string(rank) +
                               (attempt > 0 ? ".attempt-" + std::to_string(attempt) : std::string()) + ".log";
      log = fopen(path.c_str(), "we");
      if (log == nullptr) {
        close(out[0]), close(out[1]), close(err[0]), close(err[1]);
        return AbortStart(ranks, ("launch: " + path).c_str());
      }
    }
    const pid_t pid = fork();
    if (pid < 0) {
      close(out[0]), close(out[1]), close(err[0]), close(err[1]);
      if (log != nullptr) fclose(log);
      return AbortStart(ranks, "launch: fork");
    }
    if (pid == 0) {
      dup2(out[1], STDOUT_FILENO);
      dup2(err[1], STDERR_FILENO);
      close(out[0]), close(out[1]), close(err[0]), close(err[1]);
      setenv("RANK", std::to_string(rank).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(local).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(g_nproc).c_str(), 1);
      setenv("MASTER_ADDR", FLAGS_master_addr.c_str(), 1);
      setenv("MASTER_PORT", std::to_string(FLAGS_master_port).c_str(), 1);
      setenv("TESSERA_RESTART_COUNT", std::to_string(attempt).c_str(), 1);
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      signal(SIGHUP, SIG_DFL);
      signal(SIGPIPE, SIG_DFL);
      execvp(argv[1], argv + 1);
      fprintf(stderr, "launch: cannot run '%s': %s\n", argv[1], strerror(errno));
      _exit(127);
    }
    close(out[1]);
    close(err[1]);
    const bool console =
        g_console_all || std::find(g_console_ranks.begin(), g_console_ranks.end(), rank) != g_console_ranks.end();
    ranks[local] = Rank{.pid = pid, .out = out[0], .err = err[0], .running = true, .console = console, .log = log};
  }
  int exit_code = 0;
  int running = g_nproc;
  bool stopping = false;
  while (running > 0) {
    std::vector<pollfd> fds;
    std::vector<std::pair<int, bool>> who;  // (local rank, is stderr)
    for (int i = 0; i < g_nproc; ++i) {
      if (ranks[i].out >= 0) fds.push_back({ranks[i].out, POLLIN, 0}), who.push_back({i, false});
      if (ranks[i].err >= 0) fds.push_back({ranks[i].err, POLLIN, 0}), who.push_back({i, true});
    }
    if (!fds.empty()) poll(fds.data(), fds.size(), 100);
    else usleep(20000);
    for (size_t k = 0; k < fds.size(); ++k) {
      if ((fds[k].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;
      Rank& r = ranks[who[k].first];
      const std::string prefix = "[rank " + std::to_string(FLAGS_node_rank * g_nproc + who[k].first) + "] ";
      char chunk[4096];
      const ssize_t n = read(fds[k].fd, chunk, sizeof(chunk));
      std::string& buf = who[k].second ? r.err_buf : r.out_buf;
      FILE* to = !r.console ? nullptr : who[k].second ? stderr : stdout;
      if (n > 0) {
        buf.append(chunk, static_cast<size_t>(n));
        Emit(buf, prefix, to, r.log, false);
      } else {
        Emit(buf, prefix, to, r.log, true);
        close(fds[k].fd);
        (who[k].second ? r.err : r.out) = -1;
      }
    }
    for (int i = 0; i < g_nproc; ++i) {
      Rank& r = ranks[i];
      if (!r.running) continue;
      int status = 0;
      if (waitpid(r.pid, &status, WNOHANG) != r.pid) continue;
      r.running = false;
      --running;
      const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (code != 0 && exit_code == 0 && !stopping) {
        exit_code = code;
        *stopped = WIFEXITED(status) && (code == 128 + SIGTERM || code == 128 + SIGINT || code == 128 + SIGUSR1);
        fprintf(stderr, "launch: rank %d %s %d; stopping the other ranks\n", FLAGS_node_rank * g_nproc + i,
                WIFEXITED(status) ? "exited with code" : "was killed by signal",
                WIFEXITED(status) ? code : WTERMSIG(status));
        if (!r.console) {
          fprintf(stderr, "launch: (rank %d's output is not on this console (--console_ranks)%s)\n",
                  FLAGS_node_rank * g_nproc + i,
                  FLAGS_log_dir.empty() ? "; --log_dir keeps it" : ("; see " + FLAGS_log_dir).c_str());
        }
        stopping = true;
      }
    }
    if (g_signal != 0 && !stopping) {
      fprintf(stderr, "launch: got signal %d; stopping the ranks\n", static_cast<int>(g_signal));
      exit_code = 128 + g_signal;
      *signalled = true;
      stopping = true;
    }
    if (stopping && running > 0) {
      StopAll(ranks, FLAGS_grace_s);
      running = 0;
    }
  }
  // Drain what the ranks wrote last.
  for (int i = 0; i < g_nproc; ++i) {
    const std::string prefix = "[rank " + std::to_string(FLAGS_node_rank * g_nproc + i) + "] ";
    for (bool is_err : {false, true}) {
      int& fd = is_err ? ranks[i].err : ranks[i].out;
      std::string& buf = is_err ? ranks[i].err_buf : ranks[i].out_buf;
      char chunk[4096];
      while (fd >= 0) {
        const ssize_t n = read(fd, chunk, sizeof(chunk));
        if (n <= 0) {
          close(fd);
          fd = -1;
        } else {
          buf.append(chunk, static_cast<size_t>(n));
        }
      }
      Emit(buf, prefix, !ranks[i].console ? nullptr : is_err ? stderr : stdout, ranks[i].log, true);
    }
    if (ranks[i].log != nullptr) fclose(ranks[i].log);
    ranks[i].log = nullptr;
  }
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::SetUsageMessage("launch --nproc=N|gpu [--nnodes=M --node_rank=K --master_addr=H --master_port=P] -- PROGRAM [ARGS...]");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc < 2) {
    fprintf(stderr, "launch: no program to run (launch --nproc=N -- PROGRAM [ARGS...])\n");
    return 2;
  }
  if (FLAGS_nproc == "gpu") {
    g_nproc = CountGpus();
    if (g_nproc == 0) {
      fprintf(stderr, "launch: --nproc=gpu: this node has no GPU (none in CUDA_VISIBLE_DEVICES, or none under "
                      "/proc/driver/nvidia/gpus)\n");
      return 2;
    }
  } else if (!ParseDigits(FLAGS_nproc, &g_nproc)) {
    fprintf(stderr, "launch: --nproc '%s' is not a number of ranks or 'gpu'\n", FLAGS_nproc.c_str());
    return 2;
  }
  if (g_nproc < 1 || FLAGS_nnodes < 1 || FLAGS_node_rank < 0 || FLAGS_node_rank >= FLAGS_nnodes) {
    fprintf(stderr, "launch: --nproc (%d) and --nnodes (%d) must be positive and --node_rank (%d) in [0, nnodes)\n",
            g_nproc, FLAGS_nnodes, FLAGS_node_rank);
    return 2;
  }
  if (FLAGS_max_restarts < 0 || FLAGS_restart_delay_s < 0) {
    fprintf(stderr, "launch: --max_restarts (%d) and --restart_delay_s (%g) must not be negative\n", FLAGS_max_restarts,
            FLAGS_restart_delay_s);
    return 2;
  }
  if (!ParseConsoleRanks(FLAGS_console_ranks, &g_console_ranks, &g_console_all)) {
    fprintf(stderr, "launch: --console_ranks '%s' is not 'all' or a comma-separated list of ranks\n",
            FLAGS_console_ranks.c_str());
    return 2;
  }
  for (int r : g_console_ranks) {
    if (r >= FLAGS_nnodes * g_nproc) {
      fprintf(stderr, "launch: --console_ranks names rank %d; the job has ranks 0-%d\n", r,
              FLAGS_nnodes * g_nproc - 1);
      return 2;
    }
  }
  if (!FLAGS_log_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(FLAGS_log_dir, ec);
    if (ec || !std::filesystem::is_directory(FLAGS_log_dir)) {
      fprintf(stderr, "launch: cannot create --log_dir %s: %s\n", FLAGS_log_dir.c_str(),
              ec ? ec.message().c_str() : "not a directory");
      return 2;
    }
  }
  if (FLAGS_master_port <= 0 || FLAGS_master_port > 65535) {
    fprintf(stderr, "launch: --master_port %d is not a port\n", FLAGS_master_port);
    return 2;
  }
  signal(SIGINT, OnSignal);
  signal(SIGTERM, OnSignal);
  signal(SIGHUP, OnSignal);  // its ssh connection went away (ssh -tt): take the ranks down too
  signal(SIGUSR1, OnSignal);  // a scheduler's warning (sbatch --signal=USR1@120): stop the ranks, which save
  signal(SIGPIPE, SIG_IGN);
  for (int attempt = 0;; ++attempt) {
    bool signalled = false, stopped = false;
    const int code = RunAttempt(argv, attempt, &signalled, &stopped);
    if (stopped && !signalled && FLAGS_max_restarts > 0) {
      fprintf(stderr, "launch: a rank stopped on a signal (exit code %d), not a failure: not restarting\n", code);
    }
    if (code == 0 || signalled || stopped || attempt >= FLAGS_max_restarts) {
      if (code != 0 && !signalled && !stopped && FLAGS_max_restarts > 0) {
        fprintf(stderr, "launch: giving up after %d restart(s)\n", attempt);
      }
      return code;
    }
    fprintf(stderr, "launch: restarting the ranks in %g s (restart %d of %d)\n", FLAGS_restart_delay_s, attempt + 1,
            FLAGS_max_restarts);
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(FLAGS_restart_delay_s);
    while (std::chrono::steady_clock::now() < until && g_signal == 0) usleep(20000);
    if (g_signal != 0) {
      fprintf(stderr, "launch: got signal %d; not restarting\n", static_cast<int>(g_signal));
      return 128 + g_signal;
    }
  }
}
