// SPDX-License-Identifier: GPL-2.0
/*
 * C data owned by the module, compiled by Kbuild against the kernel's headers (c_sources=).
 * Rust reads `cglobal_answer` directly: with rustko's static relocation model that is an
 * ADRP/ADD/LDR pair on arm64 (R_AARCH64_ADR_PREL_PG_HI21, ...) that the module loader applies;
 * a PIC build would go through the GOT (R_AARCH64_ADR_GOT_PAGE, 311), which the loader refuses.
 */
#include "answer.h"

int cglobal_answer = 42;

/* The accessor pattern (a workaround when the relocation model cannot be chosen): Rust only
 * calls a function, and the C compiler, which always uses the kernel's model, takes the address. */
int *cglobal_answer_ptr(void)
{
	return &cglobal_answer;
}
