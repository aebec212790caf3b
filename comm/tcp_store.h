#pragma once
// TcpStore: the rendezvous key-value store of torchrun's MASTER_ADDR / MASTER_PORT kind. Rank 0 serves
// it on the port (a thread per connection); every rank, rank 0 included, is a client: set(key,
// value), and get(key), which waits until some rank has set it. Clients retry connecting until the
// timeout (rank 0 may start last); a get that outlasts the timeout throws, naming the key.
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <gloo/rendezvous/store.h>

#include "absl/status/statusor.h"

namespace tessera::comm {

class TcpStore : public gloo::rendezvous::Store {
 public:
  // serve: start the server on `port` (rank 0). Errors: the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<gloo::rendezvous::Store>> Create(const std::string& host, int port,
                                                                          bool serve,
                                                                          std::chrono::milliseconds timeout);
  ~TcpStore() override;

  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;

 private:
  struct Server;
  TcpStore(std::string host, int port, std::chrono::milliseconds timeout);
  int Connect() const;  // a connected socket, or throws after the timeout
  std::string host_;
  int port_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Server> server_;
};

}  // namespace tessera::comm
