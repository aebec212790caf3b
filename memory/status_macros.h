#pragma once
// absl::Status plumbing used across tessera:
//   RETURN_IF_ERROR(expr);          returns expr's status from the enclosing function if not ok
//   ASSIGN_OR_RETURN(lhs, expr);    lhs = *expr, or returns expr's status
//   CHECK_OK(expr);                 aborts with the status message (invariants, tools, tests)
#include <glog/logging.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define TESSERA_CONCAT_INNER_(a, b) a##b
#define TESSERA_CONCAT_(a, b) TESSERA_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                                  \
  do {                                                         \
    ::absl::Status tessera_status_ = (expr);                   \
    if (!tessera_status_.ok()) return tessera_status_;         \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr) \
  TESSERA_ASSIGN_OR_RETURN_IMPL_(TESSERA_CONCAT_(tessera_statusor_, __LINE__), lhs, expr)

#define TESSERA_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                   \
  if (!statusor.ok()) return statusor.status();             \
  lhs = std::move(*statusor)

#define CHECK_OK(expr)                                                   \
  do {                                                                   \
    ::absl::Status tessera_check_status_ = (expr);                       \
    CHECK(tessera_check_status_.ok()) << #expr << ": " << tessera_check_status_; \
  } while (0)
