#include "trace/trace-hw_nas_dedup.h"
