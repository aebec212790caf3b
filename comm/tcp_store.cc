#include "comm/tcp_store.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "absl/strings/str_cat.h"

namespace tessera::comm {
namespace {

void WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::send(fd, c, n, MSG_NOSIGNAL);
    if (w <= 0) {
      if (w < 0 && errno == EINTR) continue;
      throw std::runtime_error(absl::StrCat("TCP store: send failed: ", std::strerror(errno)));
    }
    c += w;
    n -= static_cast<size_t>(w);
  }
}

bool ReadAll(int fd, void* p, size_t n) {  // false: the peer closed the connection
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = ::recv(fd, c, n, 0);
    if (r == 0) return false;
    if (r < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

constexpr uint64_t kTimedOut = ~uint64_t{0};

}  // namespace

struct TcpStore::Server {
  int listen_fd = -1;
  std::chrono::milliseconds timeout;
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, std::vector<char>> data;
  std::atomic<bool> stop{false};
  std::vector<std::thread> handlers;
  std::thread acceptor;

  void Serve(int fd) {
    // One request per connection: 'S' key value -> ack, or 'G' key -> value (once set).
    char op = 0;
    uint32_t klen = 0;
    if (ReadAll(fd, &op, 1) && ReadAll(fd, &klen, sizeof(klen)) && klen < (1u << 20)) {
      std::string key(klen, '\0');
      if (ReadAll(fd, key.data(), klen)) {
        try {
          if (op == 'S') {
            uint64_t vlen = 0;
            if (ReadAll(fd, &vlen, sizeof(vlen)) && vlen < (uint64_t{1} << 32)) {
              std::vector<char> value(vlen);
              if (ReadAll(fd, value.data(), vlen)) {
                {
                  std::lock_guard<std::mutex> lock(mu);
                  data[key] = std::move(value);
                }
                cv.notify_all();
                const char ack = 1;
                WriteAll(fd, &ack, 1);
              }
            }
          } else if (op == 'G') {
            std::vector<char> value;
            bool found = false;
            {
              std::unique_lock<std::mutex> lock(mu);
              found = cv.wait_for(lock, timeout, [&] { return stop.load() || data.count(key) > 0; }) &&
                      data.count(key) > 0;
              if (found) value = data[key];
            }
            const uint64_t vlen = found ? value.size() : kTimedOut;
            WriteAll(fd, &vlen, sizeof(vlen));
            if (found) WriteAll(fd, value.data(), value.size());
          }
        } catch (const std::exception&) {
          // The client went away: nothing to answer.
        }
      }
    }
    ::close(fd);
  }

  void Accept() {
    while (!stop.load()) {
      const int fd = ::accept(listen_fd, nullptr, nullptr);
      if (fd < 0) {
        if (stop.load()) break;
        continue;
      }
      std::lock_guard<std::mutex> lock(mu);
      handlers.emplace_back([this, fd] { Serve(fd); });
    }
  }

  ~Server() {
    stop.store(true);
    cv.notify_all();
    if (listen_fd >= 0) {
      ::shutdown(listen_fd, SHUT_RDWR);
      ::close(listen_fd);
    }
    if (acceptor.joinable()) acceptor.join();
    for (std::thread& t : handlers) t.join();
  }
};

absl::StatusOr<std::unique_ptr<gloo::rendezvous::Store>> TcpStore::Create(const std::string& host, int port,
                                                                           bool serve,
                                                                           std::chrono::milliseconds timeout) {
  if (port <= 0 || port > 65535) return absl::InvalidArgumentError(absl::StrCat("TCP store: bad port ", port));
  std::unique_ptr<TcpStore> store(new TcpStore(host, port, timeout));
  if (serve) {
    auto server = std::make_unique<Server>();
    server->timeout = timeout;
    server->listen_fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (server->listen_fd < 0) {
      return absl::UnavailableError(absl::StrCat("TCP store: socket: ", std::strerror(errno)));
    }
    const int one = 1;
    ::setsockopt(server->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    if (::bind(server->listen_fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::listen(server->listen_fd, 1024) != 0) {
      return absl::UnavailableError(absl::StrCat("TCP store: cannot serve on port ", port, ": ",
                                                 std::strerror(errno), " (MASTER_PORT in use?)"));
    }
    Server* s = server.get();
    server->acceptor = std::thread([s] { s->Accept(); });
    store->server_ = std::move(server);
  }
  return std::unique_ptr<gloo::rendezvous::Store>(std::move(store));
}

TcpStore::TcpStore(std::string host, int port, std::chrono::milliseconds timeout)
    : host_(std::move(host)), port_(port), timeout_(timeout) {}

TcpStore::~TcpStore() = default;

int TcpStore::Connect() const {
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  std::string last = "no attempt";
  while (std::chrono::steady_clock::now() < deadline) {
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    const std::string port = std::to_string(port_);
    if (const int rc = ::getaddrinfo(host_.c_str(), port.c_str(), &hints, &res); rc != 0) {
      last = gai_strerror(rc);
    } else {
      const int fd = ::socket(res->ai_family, res->ai_socktype, res->ai_protocol);
      if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        ::freeaddrinfo(res);
        return fd;
      }
      last = std::strerror(errno);
      if (fd >= 0) ::close(fd);
      ::freeaddrinfo(res);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw std::runtime_error(absl::StrCat("TCP store ", host_, ":", port_, " unreachable for ", timeout_.count(),
                                        " ms (", last, "); is rank 0 running, and MASTER_ADDR/MASTER_PORT right?"));
}

void TcpStore::set(const std::string& key, const std::vector<char>& data) {
  const int fd = Connect();
  const char op = 'S';
  const uint32_t klen = static_cast<uint32_t>(key.size());
  const uint64_t vlen = data.size();
  char ack = 0;
  bool ok = false;
  try {
    WriteAll(fd, &op, 1);
    WriteAll(fd, &klen, sizeof(klen));
    WriteAll(fd, key.data(), key.size());
    WriteAll(fd, &vlen, sizeof(vlen));
    WriteAll(fd, data.data(), data.size());
    ok = ReadAll(fd, &ack, 1) && ack == 1;
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  if (!ok) throw std::runtime_error(absl::StrCat("TCP store: setting '", key, "' was not acknowledged"));
}

std::vector<char> TcpStore::get(const std::string& key) {
  const int fd = Connect();
  const char op = 'G';
  const uint32_t klen = static_cast<uint32_t>(key.size());
  uint64_t vlen = 0;
  std::vector<char> value;
  bool ok = false;
  try {
    WriteAll(fd, &op, 1);
    WriteAll(fd, &klen, sizeof(klen));
    WriteAll(fd, key.data(), key.size());
    ok = ReadAll(fd, &vlen, sizeof(vlen));
    if (ok && vlen != kTimedOut) {
      value.resize(vlen);
      ok = ReadAll(fd, value.data(), vlen);
    }
  } catch (...) {
    ::close(fd);
    throw;
  }
  ::close(fd);
  if (!ok) throw std::runtime_error(absl::StrCat("TCP store: lost the connection getting '", key, "'"));
  if (vlen == kTimedOut) {
    throw std::runtime_error(absl::StrCat("TCP store: no rank set '", key, "' within ", timeout_.count(), " ms"));
  }
  return value;
}

void TcpStore::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void TcpStore::wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& /*timeout*/) {
  for (const std::string& k : keys) get(k);  // each get waits up to the store's timeout
}

}  // namespace tessera::comm
