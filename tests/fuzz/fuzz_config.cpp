// libFuzzer target for everything autotune parses from users' files and flags: the size parser
// (--budget), profiles, presets and GPT model configs. The first input byte picks the parser; the
// rest is its input. Declared errors (UsageError, one line naming the field) are the expected
// answer to garbage; any other exception escapes and libFuzzer reports it as a finding, as do
// ASan/UBSan reports and a broken round trip.
//
//   scripts/fuzz [SECONDS]      (builds with clang into build-fuzz/ and runs for a fixed time)
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "autotune/errors.h"
#include "autotune/gpt.h"
#include "autotune/preset.h"
#include "autotune/profile.h"
#include "autotune/size.h"

using namespace autotune;

namespace {
// A property the parser promised was broken: abort so libFuzzer keeps the input.
void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_config: property broken: %s\n", what);
    std::abort();
  }
}

void fuzz_size(const std::string& text) {
  for (auto total : {std::optional<uint64_t>{}, std::optional<uint64_t>{24ull << 30}}) {
    try {
      const uint64_t bytes = parse_size(text, total);
      check(bytes >= 1 && bytes < (1ull << 63), "parse_size result in [1, 2^63)");
      check(!format_bytes(bytes).empty(), "format_bytes of a parsed size is not empty");
    } catch (const UsageError&) {
    }
  }
}

void fuzz_profile(const nlohmann::json& j) {
  Profile p;
  try {
    p = Profile::from_json(j);
  } catch (const UsageError&) {
    return;
  }
  // What loaded must save and load back to the same document (profiles are rewritten on reuse).
  const nlohmann::json once = p.to_json();
  const nlohmann::json twice = Profile::from_json(once).to_json();
  check(once == twice, "profile to_json -> from_json -> to_json is stable");
}

void fuzz_preset(const nlohmann::json& j) {
  try {
    (void)preset_from_json(j, "fuzz.json");
  } catch (const UsageError&) {
  }
}

void fuzz_model(const nlohmann::json& j) {
  try {
    const GptConfig c = gpt_config_from_json(j, "fuzz.json");
    // validate() accepted it: the shape must be buildable without overflow.
    check(c.n_layer > 0 && c.n_head > 0 && c.d_model > 0 && c.seq_len > 0 && c.vocab_size > 0,
          "accepted model config has positive sizes");
    check(c.d_model % c.n_head == 0, "accepted model config has n_head dividing d_model");
  } catch (const UsageError&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  const int target = data[0] % 4;
  if (target == 0) {
    fuzz_size(text);
    return 0;
  }
  // The loaders parse with exceptions off and refuse discarded documents themselves; the fuzz
  // target does the same and hands them the parsed value.
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;
  if (target == 1) fuzz_profile(j);
  if (target == 2) fuzz_preset(j);
  if (target == 3) fuzz_model(j);
  return 0;
}
