#include "checkpoint/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "memory/status_macros.h"

namespace tessera::checkpoint {
namespace {

// Linux transfers at most about 2 GiB per write(); larger pieces go in 1 GiB steps.
constexpr size_t kMaxWriteBytes = size_t{1} << 30;

absl::Status WriteAll(int fd, absl::string_view bytes, const std::string& path,
                      const std::string& tmp) {
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, std::min(left, kMaxWriteBytes));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", path, ": write to ", tmp));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

std::string DirName(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

absl::StatusOr<std::unique_ptr<AtomicFileWriter>> AtomicFileWriter::Open(const std::string& path) {
  std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", path, ": create ", tmp));
  }
  return std::unique_ptr<AtomicFileWriter>(new AtomicFileWriter(path, std::move(tmp), fd));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (committed_) return;
  if (fd_ >= 0) ::close(fd_);
  ::unlink(tmp_.c_str());
}

absl::Status AtomicFileWriter::Append(absl::string_view bytes) {
  if (fd_ < 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot write ", path_, ": already committed or failed"));
  }
  absl::Status s = WriteAll(fd_, bytes, path_, tmp_);
  if (!s.ok()) {  // (the temp file goes with the writer)
    ::close(fd_);
    fd_ = -1;
    return s;
  }
  written_ += static_cast<int64_t>(bytes.size());
  return absl::OkStatus();
}

absl::Status AtomicFileWriter::Commit() {
  if (fd_ < 0) {
    return absl::FailedPreconditionError(absl::StrCat("cannot write ", path_, ": already committed or failed"));
  }
  absl::Status status;
  if (::fsync(fd_) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", path_, ": fsync ", tmp_));
  }
  // close() can report a deferred write error (NFS, quotas), so its result counts too.
  if (::close(fd_) != 0 && status.ok()) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", path_, ": close ", tmp_));
  }
  fd_ = -1;
  if (status.ok() && ::rename(tmp_.c_str(), path_.c_str()) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat("cannot write ", path_, ": rename ", tmp_, " to it"));
  }
  if (!status.ok()) return status;  // (the destructor removes the temp file)
  committed_ = true;
  const std::string dir = DirName(path_);
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0 || ::fsync(dir_fd) != 0) {
    const int err = errno;
    if (dir_fd >= 0) ::close(dir_fd);
    return absl::ErrnoToStatus(err, absl::StrCat(path_, " was written, but fsync of its directory ", dir,
                                                 " failed, so it may not survive a crash"));
  }
  ::close(dir_fd);
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, absl::Span<const absl::string_view> pieces) {
  ASSIGN_OR_RETURN(std::unique_ptr<AtomicFileWriter> w, AtomicFileWriter::Open(path));
  for (absl::string_view piece : pieces) RETURN_IF_ERROR(w->Append(piece));
  return w->Commit();
}

}  // namespace tessera::checkpoint
