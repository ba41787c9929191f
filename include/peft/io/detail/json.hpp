// SPDX-FileCopyrightText: The peft authors
// SPDX-License-Identifier: Apache-2.0
// One strict JSON parse for the files peft reads: linear in the text (a std::map document, not
// nlohmann's ordered_json, whose inserts search linearly), duplicate keys refused (a reader that
// keeps the last and one that keeps the first would see different adapters), nesting and key
// counts bounded, and the member order of chosen top-level objects recorded on the side.
#pragma once
#include <peft/config.hpp>
#include <peft/error.hpp>
#include <peft/io/detail/fs.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <map>
#include <string>
#include <unordered_set>
#include <vector>

PEFT_NAMESPACE_BEGIN
namespace io {
namespace detail {

struct JsonLimits {
  std::size_t max_depth = 0;  ///< 0: unbounded
  std::size_t max_keys = 0;   ///< object members in the whole document; 0: unbounded
};

/**
 * Parses `text`; throws format_error "<label> is not valid JSON (...)" / "<label> has ..." for invalid JSON, a duplicate key (named
 * with its object), too deep nesting or too many keys. For each name in `ordered` that is an
 * object member of the top-level object, `order[name]` receives its members' keys in file order.
 */
inline nlohmann::json parse_json_strict(const std::string& text, const std::string& label, const JsonLimits& limits,
                                        const std::vector<std::string>& ordered = {},
                                        std::map<std::string, std::vector<std::string>>* order = nullptr) {
  using json = nlohmann::json;
  struct Frame {
    bool object;
    std::unordered_set<std::string> keys;
    std::vector<std::string>* order;  // set for a recorded top-level member
  };
  std::vector<Frame> stack;
  std::string last_key, duplicate, fault;
  std::size_t keys = 0;
  const auto shorten = [](const std::string& s) { return s.size() > 80 ? s.substr(0, 80) + "..." : s; };
  const auto callback = [&](int, json::parse_event_t event, json& parsed) -> bool {
    if (!fault.empty()) return false;  // discard the rest once refused
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start: {
        std::vector<std::string>* rec = nullptr;
        if (order && event == json::parse_event_t::object_start && stack.size() == 1 && stack[0].object) {
          for (const auto& name : ordered)
            if (name == last_key) rec = &(*order)[name];
          if (rec) rec->clear();
        }
        stack.push_back(Frame{event == json::parse_event_t::object_start, {}, rec});
        if (limits.max_depth && stack.size() > limits.max_depth) {
          fault = "nests deeper than " + std::to_string(limits.max_depth) + " levels";
          return false;
        }
        return true;
      }
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!stack.empty()) stack.pop_back();
        return true;
      case json::parse_event_t::key: {
        last_key = parsed.get<std::string>();
        if (limits.max_keys && ++keys > limits.max_keys) {
          fault = "has more than " + std::to_string(limits.max_keys) + " object keys";
          return false;
        }
        if (stack.empty()) return true;
        Frame& f = stack.back();
        if (!f.keys.insert(last_key).second) {
          fault = "has a duplicate key \"" + printable(shorten(last_key)) + "\"" +
                  (stack.size() == 1 ? std::string(" at the top level") : std::string(" in an object"));
          return false;
        }
        if (f.order) f.order->push_back(last_key);
        return true;
      }
      case json::parse_event_t::value: return true;
    }
    return true;
  };
  json doc;
#ifndef PEFT_NO_EXCEPTIONS
  try {
    doc = json::parse(text, callback);
  } catch (const json::exception& e) {
    if (fault.empty()) {
      std::string why = e.what();  // quotes the offending token, which may be the whole text
      if (why.size() > 300) why = why.substr(0, 300) + "...";
      PEFT_THROW(format_error(label + " is not valid JSON (" + why + ")"));
    }
  }
#else
  doc = json::parse(text, callback, false);
  if (doc.is_discarded() && fault.empty()) PEFT_THROW(format_error(label + " is not valid JSON"));
#endif
  if (!fault.empty()) PEFT_THROW(format_error(label + " " + fault));
  return doc;
}

}  // namespace detail
}  // namespace io
PEFT_NAMESPACE_END
