/* rustko runtime: print. */
#include <linux/printk.h>

#define RUSTKO_LOG(lvl) printk(lvl "%s: %.*s\n", KBUILD_MODNAME, (int)len, msg)

void rustko_printk(int level, const char *msg, unsigned long len)
{
	switch (level) {
	case 0: RUSTKO_LOG(KERN_EMERG); break;
	case 1: RUSTKO_LOG(KERN_ALERT); break;
	case 2: RUSTKO_LOG(KERN_CRIT); break;
	case 3: RUSTKO_LOG(KERN_ERR); break;
	case 4: RUSTKO_LOG(KERN_WARNING); break;
	case 5: RUSTKO_LOG(KERN_NOTICE); break;
	case 7: RUSTKO_LOG(KERN_DEBUG); break;
	default: RUSTKO_LOG(KERN_INFO); break;
	}
}
