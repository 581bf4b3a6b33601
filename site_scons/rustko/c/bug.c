/* rustko runtime: bug. */
#include <linux/bug.h>

/* What the in-kernel Rust support does on panic (rust/kernel/lib.rs): BUG(). */
void rustko_bug(void)
{
	BUG();
}
