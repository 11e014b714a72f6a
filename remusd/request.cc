#include "remusd/request.h"

#include <limits>

namespace remus {

using nlohmann::json;

namespace {

// Deepest nesting of objects and arrays, outside strings; stops counting
// once past `limit`.
int NestingDepth(std::string_view s, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
      if (deepest > limit) return deepest;
    } else if (c == '}' || c == ']') {
      depth--;
    }
  }
  return deepest;
}

std::string TypeOf(const json& j) {
  if (j.is_number_integer()) return "an integer";
  if (j.is_number_float()) return "a number with a fraction or exponent";
  switch (j.type()) {
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "a list";
    default: return "null";
  }
}

}  // namespace

StatusOr<json> ParseRequestLine(std::string_view line) {
  if (line.size() > kMaxRequestBytes)
    return ResourceExhausted("request is " + std::to_string(line.size()) + " bytes long; the limit is " +
                             std::to_string(kMaxRequestBytes));
  if (NestingDepth(line, kMaxRequestDepth) > kMaxRequestDepth)
    return InvalidArgument("request is nested deeper than " + std::to_string(kMaxRequestDepth) + " levels");
  json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidArgument("request is not JSON (one JSON object per line)");
  if (!j.is_object()) return InvalidArgument("request is " + TypeOf(j) + ", not a JSON object");
  return j;
}

RequestReader::RequestReader(const json& req, std::string context) : req_(req), context_(std::move(context)) {}

const json* RequestReader::Field(std::string_view field) const {
  if (!req_.is_object()) return nullptr;
  auto it = req_.find(field);
  if (it == req_.end() || it->is_null()) return nullptr;
  return &*it;
}

bool RequestReader::Has(std::string_view field) const { return Field(field) != nullptr; }

Status RequestReader::Bad(std::string_view field, std::string_view what) const {
  std::string m = context_.empty() ? "" : context_ + ": ";
  return InvalidArgument(m + "field '" + std::string(field) + "' " + std::string(what));
}

Status RequestReader::WrongType(std::string_view field, std::string_view want, const json& got) const {
  return Bad(field, "must be " + std::string(want) + ", not " + TypeOf(got));
}

StatusOr<std::string> RequestReader::String(std::string_view field, std::string_view def) const {
  const json* f = Field(field);
  if (!f) return std::string(def);
  if (!f->is_string()) return WrongType(field, "a string", *f);
  return f->get<std::string>();
}

StatusOr<bool> RequestReader::Bool(std::string_view field, bool def) const {
  const json* f = Field(field);
  if (!f) return def;
  if (!f->is_boolean()) return WrongType(field, "true or false", *f);
  return f->get<bool>();
}

StatusOr<int64_t> RequestReader::Int(std::string_view field, int64_t def, int64_t min, int64_t max) const {
  const json* f = Field(field);
  if (!f) return def;
  if (!f->is_number_integer()) return WrongType(field, "an integer", *f);
  std::string range = " (expected " + std::to_string(min) + ".." + std::to_string(max) + ")";
  if (f->is_number_unsigned()) {
    uint64_t u = f->get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) || static_cast<int64_t>(u) > max)
      return Bad(field, "is " + std::to_string(u) + ", out of range" + range);
    if (static_cast<int64_t>(u) < min) return Bad(field, "is " + std::to_string(u) + ", out of range" + range);
    return static_cast<int64_t>(u);
  }
  int64_t v = f->get<int64_t>();
  if (v < min || v > max) return Bad(field, "is " + std::to_string(v) + ", out of range" + range);
  return v;
}

StatusOr<std::vector<std::string>> RequestReader::StringList(std::string_view field) const {
  const json* f = Field(field);
  std::vector<std::string> out;
  if (!f) return out;
  if (!f->is_array()) return WrongType(field, "a list of strings", *f);
  for (const json& e : *f) {
    if (!e.is_string()) return Bad(field, "must be a list of strings; it holds " + TypeOf(e));
    out.push_back(e.get<std::string>());
  }
  return out;
}

StatusOr<std::vector<int64_t>> RequestReader::IntList(std::string_view field) const {
  const json* f = Field(field);
  std::vector<int64_t> out;
  if (!f) return out;
  if (!f->is_array()) return WrongType(field, "a list of integers", *f);
  for (const json& e : *f) {
    if (!e.is_number_integer() ||
        (e.is_number_unsigned() && e.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())))
      return Bad(field, "must be a list of integers; it holds " + TypeOf(e));
    out.push_back(e.get<int64_t>());
  }
  return out;
}

}  // namespace remus
