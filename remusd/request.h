// Reading remusd's control requests (docs/formats/control.md) without trusting
// them. The control socket is root-only, but a malformed request from a
// script must cost an error reply, never the daemon: on a primary, remusd's
// death is a failover.
//
// ParseRequestLine turns one line into a JSON object; RequestReader reads its
// fields with their JSON types checked. Every error is an InvalidArgument
// that names the field and what it should be. Nothing here throws.
//
// Thread-safety: a RequestReader is read-only and may be shared; it refers to
// the request it was made from, which must outlive it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace remus {

// Limits on one request (a line of the control protocol).
inline constexpr size_t kMaxRequestBytes = 1 << 20;  // without the newline
inline constexpr int kMaxRequestDepth = 16;           // nested objects/arrays

// One request line as a JSON object. InvalidArgument when it is not JSON, not
// an object or nested deeper than kMaxRequestDepth (checked before parsing,
// so a hostile line cannot recurse); ResourceExhausted when it is longer
// than kMaxRequestBytes.
StatusOr<nlohmann::json> ParseRequestLine(std::string_view line);

class RequestReader {
 public:
  // REQUIRES: req is a JSON object (ParseRequestLine's result) and outlives
  // the reader. Messages start with `context` when it is not empty (e.g.
  // "domain web1").
  explicit RequestReader(const nlohmann::json& req, std::string context = "");

  // A copy whose messages start with `context`.
  RequestReader In(std::string context) const { return RequestReader(req_, std::move(context)); }

  // Present and not null.
  bool Has(std::string_view field) const;

  // A missing (or null) field gives `def`; a present one must have the type.
  StatusOr<std::string> String(std::string_view field, std::string_view def) const;
  StatusOr<bool> Bool(std::string_view field, bool def) const;
  // An integer (not a float, not a string) in [min, max].
  StatusOr<int64_t> Int(std::string_view field, int64_t def, int64_t min, int64_t max) const;
  // A list of strings; missing: empty.
  StatusOr<std::vector<std::string>> StringList(std::string_view field) const;
  // A list of integers (int64 range); missing: empty.
  StatusOr<std::vector<int64_t>> IntList(std::string_view field) const;

  // InvalidArgument "<context>: field 'f' <what>", for checks of the value.
  Status Bad(std::string_view field, std::string_view what) const;

 private:
  const nlohmann::json* Field(std::string_view field) const;
  Status WrongType(std::string_view field, std::string_view want, const nlohmann::json& got) const;

  const nlohmann::json& req_;
  std::string context_;
};

}  // namespace remus
