#pragma once
#include "mock_core.h"
