#pragma once
// Crash-safe file replacement for checkpoint files: a reader (or a process restarting after a
// crash or power loss) sees either the previous file or the complete new one, never a mix.
#include <string>

#include "absl/status/status.h"
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

// The directory part of `path` ("." for a bare file name, "/" for a file in the root).
std::string DirName(const std::string& path);

}  // namespace tessera::checkpoint
