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
 * nlohmann's DOM builder (linear, unlike its callback parser, which rescans the parent object
 * after every child: quadratic) with the checks layered on its SAX events.
 */
class StrictSax : public nlohmann::detail::json_sax_dom_parser<nlohmann::json> {
  using Base = nlohmann::detail::json_sax_dom_parser<nlohmann::json>;

 public:
  StrictSax(nlohmann::json& doc, const JsonLimits& limits, const std::vector<std::string>& ordered,
            std::map<std::string, std::vector<std::string>>* order)
      : Base(doc, false), limits_(limits), ordered_(ordered), order_(order) {}

  std::string fault;   ///< set when a check refused the document
  std::string syntax;  ///< the parser's message for invalid JSON

  bool start_object(std::size_t n) {
    std::vector<std::string>* rec = nullptr;
    if (order_ && stack_.size() == 1 && stack_[0].object) {
      for (const auto& name : ordered_)
        if (name == last_key_) rec = &(*order_)[name];
      if (rec) rec->clear();
    }
    return push(true, rec) && Base::start_object(n);
  }
  bool start_array(std::size_t n) { return push(false, nullptr) && Base::start_array(n); }
  bool end_object() {
    stack_.pop_back();
    return Base::end_object();
  }
  bool end_array() {
    stack_.pop_back();
    return Base::end_array();
  }
  bool key(std::string& k) {
    if (limits_.max_keys && ++keys_ > limits_.max_keys) {
      fault = "has more than " + std::to_string(limits_.max_keys) + " object keys";
      return false;
    }
    Frame& f = stack_.back();
    if (!f.keys.insert(k).second) {
      fault = "has a duplicate key \"" + printable(k.size() > 80 ? k.substr(0, 80) + "..." : k) +
              "\"" + (stack_.size() == 1 ? " at the top level" : " in an object");
      return false;
    }
    if (f.order) f.order->push_back(k);
    last_key_ = k;
    return Base::key(k);
  }
  template <class Exception>
  bool parse_error(std::size_t, const std::string&, const Exception& e) {
    syntax = e.what();
    return false;
  }

 private:
  struct Frame {
    bool object;
    std::unordered_set<std::string> keys;
    std::vector<std::string>* order;  // set for a recorded top-level member
  };
  bool push(bool object, std::vector<std::string>* rec) {
    stack_.push_back(Frame{object, {}, rec});
    if (limits_.max_depth && stack_.size() > limits_.max_depth) {
      fault = "nests deeper than " + std::to_string(limits_.max_depth) + " levels";
      return false;
    }
    return true;
  }

  JsonLimits limits_;
  const std::vector<std::string>& ordered_;
  std::map<std::string, std::vector<std::string>>* order_;
  std::vector<Frame> stack_;
  std::string last_key_;
  std::size_t keys_ = 0;
};

/**
 * Parses `text` in linear time; throws format_error "<label> is not valid JSON (...)" or "<label>
 * has ..." for invalid JSON, a duplicate key, too deep nesting or too many keys. For each name in
 * `ordered` that is an object member of the top-level object, `order[name]` receives its members'
 * keys in file order.
 */
inline nlohmann::json parse_json_strict(
    const std::string& text, const std::string& label, const JsonLimits& limits,
    const std::vector<std::string>& ordered = {},
    std::map<std::string, std::vector<std::string>>* order = nullptr) {
  nlohmann::json doc;
  StrictSax sax(doc, limits, ordered, order);
  const bool ok = nlohmann::json::sax_parse(text, &sax);
  if (!sax.fault.empty()) PEFT_THROW(format_error(label + " " + sax.fault));
  if (!ok) {
    std::string why = sax.syntax;  // quotes the offending token, which may be the whole text
    if (why.size() > 300) why = why.substr(0, 300) + "...";
    PEFT_THROW(format_error(label + " is not valid JSON" +
                            (why.empty() ? std::string() : " (" + why + ")")));
  }
  return doc;
}

}  // namespace detail
}  // namespace io
PEFT_NAMESPACE_END
