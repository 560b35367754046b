// A second translation unit that includes every header: if a function in a header is not
// `inline`, linking this next to the unity-built tests fails with a duplicate symbol.
#include <lightron/lightron.hpp>

int lightron_odr_second_tu() { return lightron::kUsageExitCode; }
