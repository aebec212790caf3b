#pragma once
// Crash-safe file replacement for checkpoint files: a reader (or a process restarting after a
// crash or power loss) sees either the previous file or the complete new one, never a mix.
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace tessera::checkpoint {

// Writes the concatenation of `pieces` (raw bytes) to `path`: the bytes go to
// `path + ".tmp.<pid>"`, which is fsynced and renamed over `path`; then the directory is fsynced so
// that the rename itself is durable. On any failure the temp file is removed, `path` keeps its old
// contents (or stays absent) and the error names `path`. The one exception is a failed fsync of the
// directory after the rename: the new file is then in place, and the error says it may not survive
// a crash. The temp name contains only the process id, so one writer per path at a time.
absl::Status WriteFileAtomically(const std::string& path,
                                 absl::Span<const absl::string_view> pieces);

// The same, streamed: bytes go to `path + ".tmp.<pid>"` as they are appended, so a file far larger
// than memory can be written a piece at a time. Commit() fsyncs the temp file, renames it over
// `path` and fsyncs the directory (its errors as above); a writer destroyed without a successful
// Commit removes the temp file and leaves `path` as it was. Errors name `path`.
class AtomicFileWriter {
 public:
  static absl::StatusOr<std::unique_ptr<AtomicFileWriter>> Open(const std::string& path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  absl::Status Append(absl::string_view bytes);
  absl::Status Commit();
  const std::string& path() const { return path_; }
  int64_t bytes_written() const { return written_; }

 private:
  AtomicFileWriter(std::string path, std::string tmp, int fd)
      : path_(std::move(path)), tmp_(std::move(tmp)), fd_(fd) {}
  std::string path_, tmp_;
  int fd_ = -1;  // open until Commit (or an error)
  int64_t written_ = 0;
  bool committed_ = false;
};

// The directory part of `path` ("." for a bare file name, "/" for a file in the root).
std::string DirName(const std::string& path);

}  // namespace tessera::checkpoint
